"""A fresh process's fixed costs (issue 14): `import mlxgen`, then a cached load and a first token.

Per source tree (`--trees LABEL=DIR,...`, e.g. a `git archive` of the base commit and this
worktree), interleaved round by round, medians reported with each tree's ratio to the first:

- import: a new `python -c "import mlxgen"`: the parent's wall time for the whole process
  (interpreter start included) and the time the import itself took inside it;
- first token: a new process that imports mlxgen, loads `--model` through the converted-weights
  cache (an entry is written first) and generates one token (greedy): its import, load, first
  token and the whole process's wall time; with `--phases`, the cached load's parts too (cache
  read: the files, the tokenizer built while MLX reads the weights; build_model).

CPU time (the child's user + system) is reported beside the wall times: on a shared machine it
is the steadier measure. `--warm-mb N` touches N MB in a throwaway process before every sample
(this VM's host reclaims idle guest memory; a Mac does not).

    git archive <base> | tar -x -C /tmp/base
    python bench/import_time.py --trees base=/tmp/base,this=. --rounds 10 --warm-mb 2000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load_time import PHASE_TIMER  # noqa: E402  (the child's phase timer, shared)

IMPORT = r"""
import json, time
t = time.perf_counter()
import mlxgen
print(json.dumps({"import_s": time.perf_counter() - t}))
"""

FIRST_TOKEN = r"""
import json, sys, time
t0 = time.perf_counter()
import mlxgen
t1 = time.perf_counter()
phases = {}
""" + PHASE_TIMER + r"""
if sys.argv[2] == "1":
    from mlxgen import loading
    from mlxgen.loading import converted
    converted.Entry.read = timed("cache_read_s", converted.Entry.read)
    loading.build_model = timed("build_s", loading.build_model)
model, tok = mlxgen.load(sys.argv[1])
t2 = time.perf_counter()
text = mlxgen.generate(model, tok, "The capital of France is", max_tokens=1)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2,
                  "import_load_token_s": t3 - t0, "text": text, **phases}))
"""

WARM = "import numpy as np, sys; np.ones(int(sys.argv[1]) << 17)"  # MB of float64


def child(tree: str, code: str, *args: str, warm_mb: int = 0) -> dict:
    if warm_mb:
        subprocess.run([sys.executable, "-c", WARM, str(warm_mb)], check=True)
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), MLXGEN_LOG_LEVEL="ERROR")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         check=True, env=env, cwd=os.path.abspath(tree), timeout=600)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "process_s": wall, "process_cpu_s": cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", default="this=.", help="LABEL=DIR,... source trees to compare")
    p.add_argument("--model", default="smollm2:135m", help="a PyPI model name or a .gguf path")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warm-mb", type=int, default=0)
    p.add_argument("--phases", action="store_true", help="also time the cached load's parts")
    p.add_argument("--no-first-token", action="store_true", help="only `import mlxgen`")
    a = p.parse_args()
    trees = dict(t.split("=", 1) for t in a.trees.split(","))
    if not a.no_first_token:  # the cache entry each tree's samples read
        for tree in trees.values():
            child(tree, FIRST_TOKEN, a.model, "0")
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(a.rounds):
        for label, tree in trees.items():
            runs.setdefault((label, "import"), []).append(child(tree, IMPORT, warm_mb=a.warm_mb))
            if not a.no_first_token:
                runs.setdefault((label, "first token"), []).append(
                    child(tree, FIRST_TOKEN, a.model, "1" if a.phases else "0", warm_mb=a.warm_mb))
        print(f"round {r}: " + "; ".join(f"{k[0]} {k[1]} {v[-1]['process_s']:.3f} s" for k, v in runs.items()),
              flush=True)
    print(f"\n{a.model}: medians of {a.rounds} interleaved rounds, fresh processes"
          + (f", {a.warm_mb} MB touched before each" if a.warm_mb else "")
          + f" (ratio to {next(iter(trees))})")
    for kind in ("import", "first token"):
        rows = {label: runs[(label, kind)] for label in trees if (label, kind) in runs}
        if not rows:
            continue
        keys = [k for k in rows[next(iter(rows))][0] if k.endswith("_s")]
        base = {k: statistics.median(s[k] for s in rows[next(iter(rows))]) for k in keys}
        print(f"\n{kind}:\n| tree | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
        for label, samples in rows.items():
            med = {k: statistics.median(s.get(k, 0.0) for s in samples) for k in keys}
            print(f"| {label} | " + " | ".join(f"{med[k]:.3f} ({med[k] / base[k]:.2f})" if base[k]
                                               else f"{med[k]:.3f}" for k in keys) + " |")
        if kind == "first token":
            print("answers: " + "; ".join(f"{label}: {rows[label][0]['text']!r}" for label in rows))


if __name__ == "__main__":
    main()
