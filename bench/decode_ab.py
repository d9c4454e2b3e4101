"""Decode tok/s of two source trees of mlxgen side by side (e.g. before and after a kernel
change): each sample a fresh process, the trees interleaved round by round, medians.

    python bench/decode_ab.py --before ../base --after . --model qwen2.5-coder:0.5b [--rounds 3]

Each process loads the model (default settings), warms up on a short prompt, then for a ~100 and
a ~2,000-token prompt of random tokens decodes 64 greedy tokens (EOS ignored) and reports
mlxgen's own decode tok/s, as bench/decode_memory.py does."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, random, sys
import mlxgen
model, tok = mlxgen.load(sys.argv[1])
rng = random.Random(0)
def decode(n, tokens=64):
    ids = [rng.randrange(1000, min(30000, model.args.vocab_size - 1)) for _ in range(n)]
    r = None
    for r in mlxgen.stream_generate(model, tok, ids, max_tokens=tokens):
        pass
    return r.stats.decode_tps
decode(16, 8)
print(json.dumps({n: decode(n) for n in (100, 2000)}))
"""


def sample(tree: str, model: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), MLXGEN_LOG_LEVEL="ERROR")
    out = subprocess.run([sys.executable, "-c", CHILD, model], capture_output=True, text=True, check=True,
                         env=env, cwd=os.path.abspath(tree)).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    trees = {"before": args.before, "after": args.after}
    runs = {name: [] for name in trees}
    for r in range(args.rounds):
        for name, tree in (trees.items() if r % 2 == 0 else reversed(trees.items())):
            runs[name].append(sample(tree, args.model))
            print(name, runs[name][-1], flush=True)
    print(f"model {args.model}; medians of {args.rounds} interleaved fresh processes; load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| context | before tok/s | after tok/s | after / before |\n|---|---|---|---|")
    for n in ("100", "2000"):
        b = statistics.median(s[n] for s in runs["before"])
        a = statistics.median(s[n] for s in runs["after"])
        print(f"| ~{n} | {b:.1f} | {a:.1f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
