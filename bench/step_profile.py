"""What one decode step costs besides reading the weights (issue 14, per-step overhead).

Each sample is a fresh process on one source tree (`--trees`, e.g. a `git archive` of the base
commit and this worktree), interleaved round by round; medians over rounds are reported, with
each tree's ratio to the first. A sample loads the model, prefills `--context` random tokens and
measures, at that context:

- nodes: the graph of one step (`model(token, cache)`), counted by primitive (mx.export_to_dot);
- build: Python time to build one step's graph; eval: mx.eval of it (steps run one by one);
- piped: a step in generate's pattern (build step n+1 and its greedy token while step n
  evaluates, mx.async_eval);
- generate: ms per token of `stream_generate` (greedy, EOS ignored) at the same context: the
  difference to `piped` is the loop's own cost (sampler, detokenizer, stats).

    python bench/step_profile.py --model smollm2:135m --trees /tmp/base,. --rounds 5
    python bench/step_profile.py --model qwen2.5-coder:0.5b --threads 2,1   # decode kernel threads
    python bench/step_profile.py --model smollm2:135m --cprofile   # where the build time goes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import collections, json, os, random, re, sys, tempfile, time
import statistics as st
import mlx.core as mx
import mlxgen
from mlxgen.prefill import prefill

name, context, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model, tok = mlxgen.load(name)
if threads:  # the decode kernels' thread count (quantized matvec, matvec, attention)
    from mlxgen.backends.cpu import layers, ops
    layers.MATVEC_THREADS = ops._THREADS = threads
rng = random.Random(0)
ids = [rng.randrange(1000, min(30000, model.args.vocab_size - 1)) for _ in range(context)]
cache = model.make_cache()
mx.eval(prefill(model, ids, cache))
t = mx.array([[ids[-1]]])
for _ in range(5):
    mx.eval(model(t, cache))

path = os.path.join(tempfile.mkdtemp(), "step.dot")
mx.export_to_dot(path, model(t, cache))
ops = collections.Counter(re.findall(r'label ="([^"]*)"', open(path).read()))
mx.eval(model(t, cache))

build, evals = [], []
for _ in range(steps):
    a = time.perf_counter(); y = model(t, cache); b = time.perf_counter(); mx.eval(y)
    build.append(b - a); evals.append(time.perf_counter() - b)

def greedy(logits):
    return mx.argmax(logits[:, -1, :], axis=-1)

token = greedy(model(t, cache)); mx.async_eval(token)
a = time.perf_counter()
for _ in range(steps):
    nxt = greedy(model(token[None], cache)); mx.async_eval(nxt)
    token.item(); token = nxt
token.item()
piped = (time.perf_counter() - a) / steps

n_keys = cache[0].offset
r = None
for r in mlxgen.stream_generate(model, tok, ids, max_tokens=steps + 1):
    pass
gen = 1 / r.stats.decode_tps
print(json.dumps({"nodes": sum(ops.values()), "ops": dict(ops), "build_ms": 1e3 * st.median(build),
                  "eval_ms": 1e3 * st.median(evals), "piped_ms": 1e3 * piped, "generate_ms": 1e3 * gen,
                  "keys": n_keys}))
"""

PROFILE = r"""
import cProfile, pstats, random, sys
import mlx.core as mx
import mlxgen
from mlxgen.prefill import prefill
model, tok = mlxgen.load(sys.argv[1])
rng = random.Random(0)
ids = [rng.randrange(1000, 30000) for _ in range(int(sys.argv[2]))]
cache = model.make_cache()
mx.eval(prefill(model, ids, cache))
t = mx.array([[ids[-1]]])
mx.eval(model(t, cache))
prof = cProfile.Profile()
for _ in range(int(sys.argv[3])):
    prof.enable(); y = model(t, cache); prof.disable(); mx.eval(y)
pstats.Stats(prof).sort_stats("tottime").print_stats(25)
"""

KEYS = ("nodes", "build_ms", "eval_ms", "piped_ms", "generate_ms")


def sample(tree: str, threads: int, model: str, context: int, steps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), MLXGEN_LOG_LEVEL="ERROR")
    proc = subprocess.run([sys.executable, "-c", CHILD, model, str(context), str(steps), str(threads)],
                          capture_output=True, text=True, check=True, env=env, cwd=tree)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2:135m")
    p.add_argument("--trees", default=".", help="comma-separated source trees to compare")
    p.add_argument("--context", type=int, default=150)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", default="0", help="comma-separated decode kernel threads (0: the default)")
    p.add_argument("--cprofile", action="store_true", help="profile building the graph instead")
    a = p.parse_args()
    trees = a.trees.split(",")
    if a.cprofile:
        env = dict(os.environ, PYTHONPATH=os.path.abspath(trees[0]), MLXGEN_LOG_LEVEL="ERROR")
        subprocess.run([sys.executable, "-c", PROFILE, a.model, str(a.context), str(a.steps)],
                       check=True, env=env, cwd=trees[0])
        return
    variants = [(t, int(n)) for t in trees for n in a.threads.split(",")]
    runs: dict[tuple, list[dict]] = {v: [] for v in variants}
    for r in range(a.rounds):
        for v in variants:
            runs[v].append(sample(*v, a.model, a.context, a.steps))
            print(f"round {r} {v}: " + ", ".join(f"{k} {runs[v][-1][k]:.1f}" for k in KEYS), flush=True)
    base = {k: statistics.median(s[k] for s in runs[variants[0]]) for k in KEYS}
    print(f"\n{a.model}, ~{a.context} keys, medians of {a.rounds} interleaved rounds "
          f"(ratio to {variants[0][0]})")
    print("| tree | threads | " + " | ".join(KEYS) + " |\n|---|---|" + "---|" * len(KEYS))
    for v in variants:
        med = {k: statistics.median(s[k] for s in runs[v]) for k in KEYS}
        print(f"| {v[0]} | {v[1] or 'default'} | "
              + " | ".join(f"{med[k]:.1f} ({med[k] / base[k]:.2f})" for k in KEYS) + " |")
    for t in trees:
        ops = runs[(t, variants[0][1])][0]["ops"]
        print(f"\nnodes per step, {t}: " + ", ".join(f"{k} {n}" for k, n in sorted(ops.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
