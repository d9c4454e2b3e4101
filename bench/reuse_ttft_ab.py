"""TTFT of reused prompts against the cold prefill, interleaved (issue 18, second session).

The quality sweeps (`mlxgen bench reuse`) time each setting once per question, under `nice`: on a
shared machine their speed-up column is noisy. This script times, for a few questions, the cold
prefill and each setting in rotating order, `--rounds` times, and reports each setting's median
ratio cold / reused (ratios taken within a round, so load drifts cancel).

    python bench/reuse_ttft_ab.py --model smollm2 --docs 4 --questions 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import mlx.core as mx

from mlxgen import load
from mlxgen.bench.reuse import parse_settings
from mlxgen.bench.reuse_data import fit
from mlxgen.bench.reuse_docs import doc_sets
from mlxgen.bench.reuse_quality import rag_segments
from mlxgen.cache import make_cache
from mlxgen.prefill import prefill
from mlxgen.reuse import ChunkStore
from mlxgen.reuse.compose import plan
from mlxgen.reuse.recompute import Ape

DEFAULT = ("alone/none,alone/auto,alone/mixed/0.15,context/none,context/auto,"
           "context/first/0.05,context/first/0.15")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--questions", type=int, default=1, help="per document set")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--settings", default=DEFAULT)
    p.add_argument("--ape", default="", help="T:S: also time each context setting with APE's "
                   "temperature/scale (recompute.Ape)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    grid = [(*g, None) for g in parse_settings(args.settings)]
    if args.ape:
        ape = Ape(*(float(x) for x in args.ape.split(":")))
        grid += [(*g[:3], ape) for g in grid if g[0] != "alone"]
    model, tok = load(args.model)
    mx.eval(prefill(model, list(range(64)), make_cache(len(model.layers))))  # warm-up
    ratios: dict[str, list[float]] = {_name(g): [] for g in grid}
    load_start = os.getloadavg()
    for docset in doc_sets(args.docs):
        docs = [fit(tok, d, 512) for d in docset.docs]
        stores = {s: ChunkStore(model, tok) for s in dict.fromkeys(g[0] for g in grid)}
        for q in docset.questions[: args.questions]:
            segs = {s: rag_segments(tok, st, q, docs, 512, context=s != "alone",
                                    stand_in=s == "standin") for s, st in stores.items()}
            ids = plan(model, tok, next(iter(segs.values())), parse_special=True).ids
            for r in range(args.rounds):
                times = {}
                order = [None] + list(grid)
                order = order[r % len(order):] + order[: r % len(order)]  # rotate the order
                for g in order:
                    start = time.perf_counter()
                    if g is None:
                        mx.eval(prefill(model, ids, make_cache(len(model.layers))))
                    else:
                        store, strategy, f, ape = g
                        comp = plan(model, tok, segs[store], parse_special=True)
                        _, logits = comp.run(model, recompute=f, recompute_strategy=None
                                             if strategy in ("none", "auto") else strategy,
                                             ape=ape)
                        mx.eval(logits)
                    times[g] = time.perf_counter() - start
                for g in grid:
                    ratios[_name(g)].append(times[None] / times[g])
                print(f"{docset.name} round {r}: cold {times[None]:.2f} s; " + ", ".join(
                    f"{k}: {ratios[k][-1]:.1f}x" for k in ratios), flush=True)
    print(f"load average {load_start} -> {os.getloadavg()}")
    for k, v in ratios.items():
        print(f"{k:28} median {statistics.median(v):5.1f}x  (n={len(v)}, min {min(v):.1f}, "
              f"max {max(v):.1f})")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"model": args.model, "docs": args.docs, "ratios": ratios,
                       "load": [load_start, os.getloadavg()]}, fh, indent=1)


def _name(g) -> str:
    s, strategy, f, ape = g
    return f"{s} {strategy} {f}" + (f" ape {ape.temperature:g}:{ape.scale:g}" if ape else "")


if __name__ == "__main__":
    main()
