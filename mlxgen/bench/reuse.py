"""`mlxgen bench reuse`: K/V reuse against cold prefill.

- rag: 4 documents of 512 tokens stored once as chunks, reused across 5 different ~30-token
  questions; TTFT cold (full prefill of the same tokens) vs reused, and quality (greedy agreement
  over 32 tokens, KL) for each recompute fraction;
- chat: a 5-turn assistant conversation (~100-token system prompt, ~20-token user turns, replies
  of up to 50 tokens), then 5 turns on top of a ~2,000-token history; prefilled tokens and TTFT
  per turn, cold (fresh prefill of the whole conversation) vs Session.
Results: bench/results/reuse-<model>.json and .md. The CPU is shared: the load average at the
start and end of each run is recorded beside the numbers."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import mlx.core as mx

from ..cache import make_cache
from ..errors import MlxgenError
from ..prefill import prefill
from ..reuse import ChunkStore
from ..reuse.compose import plan
from .reuse_chat import run_chat
from .reuse_data import QUESTIONS
from .reuse_quality import composed_quality, docs_for, rag_segments, reference
from .reuse_report import write_report

FRACTIONS = (0.0, 0.05, 0.15, 0.3, 1.0)


def run_rag(model, tokenizer, fractions: Sequence[float], strategy: str, reps: int,
            n_questions: int, doc_tokens: int, log) -> dict:
    """TTFT here is prompt -> first-token logits evaluated (tokenizing, composing / prefilling,
    LM head), the same span stream_generate's TTFT covers minus sampling one token."""
    store = ChunkStore(model, tokenizer)
    docs = docs_for(tokenizer, doc_tokens)
    stop = tokenizer.eos_token_ids
    mx.eval(prefill(model, list(range(64)), make_cache(len(model.layers))))  # warm-up
    start = time.perf_counter()
    rag_segments(tokenizer, store, QUESTIONS[0], docs, doc_tokens)
    encode_s = time.perf_counter() - start
    log(f"  stored {len(docs)} chunks in {encode_s:.2f} s (one-time)")
    rows = {f: [] for f in fractions}
    questions = []
    for qi, question in enumerate(QUESTIONS[:n_questions]):
        segments = rag_segments(tokenizer, store, question, docs, doc_tokens)
        ids = plan(model, tokenizer, segments, parse_special=True).ids  # template head/tail
        cont, ref, first = reference(model, ids, stop=stop)
        cold = statistics.median([first] + [reference(model, ids, 1)[2] for _ in range(reps - 1)])
        questions.append({"prompt_tokens": len(ids), "cold_ttft_s": cold,
                          "reference": tokenizer.decode(cont)})
        log(f"  Q{qi + 1}: {len(ids)} tokens, cold TTFT {cold:.3f} s, reference "
            f"{tokenizer.decode(cont)!r}")
        for f in fractions:
            runs = [composed_quality(model, tokenizer, segments, cont, ref, recompute=f,
                                     recompute_strategy=strategy) for _ in range(reps)]
            quality, _, cached = runs[0]
            reused = statistics.median(r[1] for r in runs)
            rows[f].append(dict(vars(quality), ttft_s=reused, cached_tokens=cached,
                                speedup=cold / reused))
            log(f"    recompute {f:.2f}: TTFT {reused:.3f} s ({cold / reused:.1f}x), agreement "
                f"{quality.agreement:.2f} of {quality.n}, prefix {quality.prefix}, "
                f"KL {quality.kl:.3f}")
    table = []
    for f in fractions:
        r = rows[f]
        table.append({
            "recompute": f,
            "agreement": statistics.mean(x["agreement"] for x in r),
            "agreement_min": min(x["agreement"] for x in r),
            "prefix": statistics.mean(x["prefix"] for x in r),
            "n": statistics.mean(x["n"] for x in r),
            "kl": statistics.mean(x["kl"] for x in r),
            "kl_first": statistics.mean(x["kl_first"] for x in r),
            "ttft_s": statistics.median(x["ttft_s"] for x in r),
            "speedup": statistics.median(x["speedup"] for x in r),
            "cached_tokens": statistics.mean(x["cached_tokens"] for x in r),
        })
    return {"strategy": strategy, "doc_tokens": doc_tokens, "encode_s": encode_s,
            "cold_ttft_s": statistics.median(q["cold_ttft_s"] for q in questions),
            "questions": questions, "table": table, "per_question": {str(f): rows[f] for f in rows}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlxgen bench reuse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="model source (repeatable; default smollm2)")
    p.add_argument("--parts", default="rag,chat", help="comma list of rag, chat (default both)")
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)),
                   help="recompute fractions for the RAG table")
    p.add_argument("--strategy", default=None, help="recompute strategy: deviation, first, mixed")
    p.add_argument("--questions", type=int, default=len(QUESTIONS))
    p.add_argument("--doc-tokens", type=int, default=512)
    p.add_argument("--reps", type=int, default=1, help="TTFT repetitions (median)")
    p.add_argument("--out", default="bench/results", help="results directory")
    return p


def run_cli(argv: Sequence[str]) -> int:
    from .. import load
    from ..reuse.recompute import check_strategy

    args = build_parser().parse_args(list(argv))
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        raise MlxgenError(f"--fractions must be comma-separated numbers; got {args.fractions!r}.")
    parts = set(args.parts.split(","))
    if not parts <= {"rag", "chat"}:
        raise MlxgenError(f"--parts takes rag and/or chat; got {args.parts!r}.")
    strategy = check_strategy(args.strategy)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    for source in args.model or ["smollm2"]:
        result = {"model": source, "load_avg_start": os.getloadavg(), "cpu_count": os.cpu_count(),
                  "device": str(mx.default_device())}
        model, tokenizer = load(source)
        log(f"{source}: {model.model_type}, {len(model.layers)} layers")
        if "rag" in parts:
            result["rag"] = run_rag(model, tokenizer, fractions, strategy, args.reps,
                                    args.questions, args.doc_tokens, log)
        if "chat" in parts:
            result["chat"] = run_chat(model, tokenizer, log)
        result["load_avg_end"] = os.getloadavg()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = "reuse-" + Path(source).name.replace(":", "_")
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        (out / f"{name}.md").write_text(write_report(result))
        log(f"wrote {out / name}.json and .md")
        print(write_report(result))
    return 0


def main() -> int:
    try:
        return run_cli(sys.argv[1:])
    except MlxgenError as e:
        print(f"mlxgen bench reuse: error: {e}", file=sys.stderr)
        return 2
