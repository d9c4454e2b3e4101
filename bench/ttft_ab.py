"""TTFT of two source trees of mlxgen side by side: each sample a fresh process (load excluded),
the trees interleaved round by round, medians per prompt length. For checking that a change
keeps speed (e.g. `python bench/ttft_ab.py --before ../base --after . --model smollm2:135m`).

Every process loads the model, warms up once, then times `stream_generate` to its first token
on a prompt of fresh random tokens (no cache can help) for each length."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

CHILD = r"""
import json, random, sys, time
import mlx.core as mx
import mlxgen
model, tok = mlxgen.load(sys.argv[1])
lengths = [int(n) for n in sys.argv[2].split(",")]
def ttft(n):
    ids = [random.randrange(100, model.args.vocab_size - 100) for _ in range(n)]
    t = time.perf_counter()
    next(mlxgen.stream_generate(model, tok, ids, max_tokens=1))
    return time.perf_counter() - t
ttft(64)
print(json.dumps({n: ttft(n) for n in lengths}))
"""


def sample(tree: str, model: str, lengths: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    out = subprocess.run([sys.executable, "-c", CHILD, model, lengths], env=env, check=True,
                         capture_output=True, text=True, cwd=os.path.abspath(tree)).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True)
    p.add_argument("--after", default=".")
    p.add_argument("--model", default="smollm2:135m")
    p.add_argument("--lengths", default="128,512,2048")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    runs = {"before": [], "after": []}
    for r in range(a.rounds):
        for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
            runs[name].append(sample(getattr(a, name), a.model, a.lengths))
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"machine: {cpu}, {os.cpu_count()} cores; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}; "
          f"model {a.model}; {a.rounds} interleaved processes per tree")
    print("| tokens | before (s) | after (s) | after / before |\n|---|---|---|---|")
    for n in a.lengths.split(","):
        b = statistics.median(s[n] for s in runs["before"])
        f = statistics.median(s[n] for s in runs["after"])
        print(f"| {n} | {b:.3f} | {f:.3f} | {f / b:.2f} |")


if __name__ == "__main__":
    main()
