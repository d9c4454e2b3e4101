"""The prompt's head served from the store vs computed in the composition's pass (issue 18,
session 12), interleaved in one process.

A RAG prompt opens with the chat-template head its first document was stored after; the store
keeps that context's K/V, and the composition splices them ("store"). "computed" hides them
(ChunkStore.kept_context returns None), so the head is computed as before. One prompt per
document set, documents stored after the stand-in; prints each setting's median composition time
and the ratio computed / store, and the largest logit difference between the two.

    python bench/reuse_head_ab.py --model smollm2 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from mlxgen import load
from mlxgen.bench.reuse_data import fit
from mlxgen.bench.reuse_docs import doc_sets
from mlxgen.bench.reuse_quality import rag_segments
from mlxgen.cache import make_cache
from mlxgen.prefill import prefill
from mlxgen.reuse import ChunkStore
from mlxgen.reuse.compose import plan

SETTINGS = ((0.0, "first"), ("auto", None), (0.2, "first"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    model, tok = load(args.model)
    mx.eval(prefill(model, list(range(64)), make_cache(len(model.layers))))  # warm-up
    prompts = []
    for docset in doc_sets(4):
        docs = [fit(tok, d, 512) for d in docset.docs]
        segments = rag_segments(tok, ChunkStore(model, tok), docset.questions[0], docs, 512,
                                context=True, stand_in=True)
        prompts.append(plan(model, tok, segments, parse_special=True))
    kept = ChunkStore.kept_context
    modes = {"store": kept, "computed": lambda self, context: None}
    times: dict[tuple, list[float]] = {}
    logits: dict[tuple, mx.array] = {}
    for r in range(args.rounds):
        for mode in ("store", "computed") if r % 2 == 0 else ("computed", "store"):
            ChunkStore.kept_context = modes[mode]
            for f, strategy in SETTINGS:
                for i, composition in enumerate(prompts):
                    start = time.perf_counter()
                    _, out = composition.run(model, recompute=f, recompute_strategy=strategy)
                    mx.eval(out)
                    times.setdefault((mode, f), []).append(time.perf_counter() - start)
                    logits[mode, f, i] = out
    ChunkStore.kept_context = kept
    print(f"{args.model}: {args.rounds} rounds x {len(prompts)} prompts")
    for f, _ in SETTINGS:
        store, computed = (statistics.median(times[m, f]) for m in ("store", "computed"))
        diff = max(mx.abs(logits["store", f, i] - logits["computed", f, i]).max().item()
                   for i in range(len(prompts)))
        print(f"recompute {f!s:>4}: store {store:.3f} s, computed {computed:.3f} s, "
              f"computed / store {computed / store:.2f}x, max logit difference {diff:.4f}")


if __name__ == "__main__":
    main()
