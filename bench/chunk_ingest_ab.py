"""Storing documents after a context: the context's K/V computed once per store vs once per
document (issue 18, session 11), interleaved in one process.

The server stores a request's first document after the chat-template head and the others after
the head + the stand-in document + the separator (mlxgen/reuse/stand_in.py). "shared" is the
store as it is (ChunkStore keeps its last contexts' K/V); "each" turns that off, so every
document runs its context again, as before session 11.

    python bench/chunk_ingest_ab.py --model smollm2 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

from mlxgen import load
from mlxgen.bench.reuse_data import fit
from mlxgen.bench.reuse_docs import doc_sets
from mlxgen.reuse import ChunkStore, after_stand_in

HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model, tok = load(args.model)
    docs = [fit(tok, d, 512) for d in doc_sets(args.docs)[0].docs]
    head = tok.encode(HEAD, parse_special=True)
    later = after_stand_in(tok, head, tok.encode("\n\n", add_special_tokens=False))
    print(f"{args.model}: {len(docs)} documents of 512 tokens; context {len(head)} tokens for "
          f"the first, {len(later)} for the others")
    times: dict[str, list[float]] = {"shared": [], "each": []}
    for r in range(args.rounds):
        for mode in ("shared", "each") if r % 2 == 0 else ("each", "shared"):
            store = ChunkStore(model, tok)
            if mode == "each":
                store._context_kv = lambda context: None  # every document runs its context
            start = time.perf_counter()
            for i, d in enumerate(docs):
                store.add(d, context=later if i else head)
            times[mode].append(time.perf_counter() - start)
    for mode, v in times.items():
        print(f"{mode:7} median {statistics.median(v):.2f} s  ({', '.join(f'{x:.2f}' for x in v)})")


if __name__ == "__main__":
    main()
