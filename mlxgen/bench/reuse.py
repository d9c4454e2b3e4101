"""`mlxgen bench reuse`: K/V reuse against cold prefill.

- rag: 4 (~2.1k tokens) or 16 (~8.2k) documents of 512 tokens stored once as chunks, reused
  across ~30-token questions over two unrelated document sets (reuse_docs), chat-templated; TTFT
  cold (full prefill of the same tokens) vs reused, and quality against the full prefill
  (reuse_quality: teacher-forced greedy agreement with its spread, identical prefix, first-token
  agreement, KL) for recompute 0 .. 0.3 of each strategy and for recompute="auto", with the
  documents stored alone and stored after the prompt's template head (ChunkStore context);
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
from ..reuse.recompute import STRATEGIES, check_strategy
from .reuse_data import fit
from .reuse_docs import doc_sets
from .reuse_quality import composed_quality, rag_segments, reference, summarize
from .reuse_report import write_report

FRACTIONS = (0.0, 0.05, 0.15, 0.3)
# documents encoded alone, after the prompt's template head, or (after the first) after the head
# and a stand-in document (reuse.stand_in)
STORES = ("alone", "context", "standin")

Setting = tuple[str, str, object]  # (store, strategy, recompute)


def settings_for(fractions: Sequence[float], strategies: Sequence[str],
                 stores: Sequence[str] = STORES) -> list[Setting]:
    """(store, strategy, recompute) rows of the frontier, per store: recompute 0 once (it is the
    same for every strategy), each strategy at each other fraction, and "auto"."""
    rows: list[Setting] = []
    for store in stores:
        rows += [(store, "none", 0.0)] if 0.0 in fractions else []
        rows += [(store, s, f) for s in strategies for f in fractions if f > 0]
        rows += [(store, "auto", "auto")]
    return rows


def parse_settings(text: str) -> list[Setting]:
    """--settings "alone/mixed/0.15,context/none/0,context/auto" -> rows."""
    rows: list[Setting] = []
    for item in filter(None, text.split(",")):
        parts = item.split("/")
        store, strategy = parts[0], parts[1] if len(parts) > 1 else ""
        ok = store in STORES and (strategy in ("none", "auto") or strategy in STRATEGIES)
        try:
            f = "auto" if strategy == "auto" else 0.0 if strategy == "none" else float(parts[2])
        except (IndexError, ValueError):
            ok = False
        if not ok or (strategy in STRATEGIES and not 0 < f <= 1):
            raise MlxgenError(f"--settings item {item!r}: expected STORE/none, STORE/auto or "
                              f"STORE/STRATEGY/FRACTION (stores {', '.join(STORES)}; strategies "
                              f"{', '.join(STRATEGIES)}; 0 < FRACTION <= 1).")
        rows.append((store, strategy, f))
    return rows


def run_rag(model, tokenizer, grid: Sequence[Setting], reps: int, n_questions: int,
            doc_tokens: int, n_docs: int, log, progress=None, skip: int = 0) -> dict:
    """TTFT here is prompt -> first-token logits evaluated (tokenizing, composing / prefilling,
    LM head), the same span stream_generate's TTFT covers minus sampling one token.
    n_questions per document set (two sets: reuse_docs.doc_sets) after the first `skip` of each
    (a later run extends an earlier one's questions), alternating between the sets;
    the full-prefill reference of each question is computed once and shared by every setting;
    progress(result so far) is called after each question."""
    stop = tokenizer.eos_token_ids
    mx.eval(prefill(model, list(range(64)), make_cache(len(model.layers))))  # warm-up
    rows: dict[str, list[dict]] = {setting_key(*g): [] for g in grid}
    stores = list(dict.fromkeys(g[0] for g in grid))
    questions, encode_s = [], {s: 0.0 for s in stores}
    sets = doc_sets(n_docs)
    prompts = []  # (set name, question, stored documents)
    for docset in sets:
        asked = docset.questions[skip : skip + n_questions]
        if skip < 0 or not asked:
            raise MlxgenError(f"--skip-questions {skip}: the {docset.name!r} set has "
                              f"{len(docset.questions)} questions; skip fewer.")
        by_store = {s: ChunkStore(model, tokenizer) for s in stores}
        docs = [fit(tokenizer, d, doc_tokens) for d in docset.docs]
        for s, store in by_store.items():
            start = time.perf_counter()
            rag_segments(tokenizer, store, docset.questions[0], docs, doc_tokens,
                         context=s != "alone", stand_in=s == "standin")
            encode_s[s] += time.perf_counter() - start
        prompts.append([(docset.name, q, by_store, docs) for q in asked])
    log(f"  stored {sum(len(d.docs) for d in sets)} documents per store in "
        + ", ".join(f"{s} {t:.2f} s" for s, t in encode_s.items()) + " (one-time)")

    def result() -> dict:
        done = [g for g in grid if rows[setting_key(*g)]]
        return {"stores": stores, "doc_tokens": doc_tokens, "n_docs": n_docs,
                "encode_s": encode_s, "sets": [d.name for d in sets],
                "cold_ttft_s": statistics.median(q["cold_ttft_s"] for q in questions),
                "questions": questions, "per_question": rows,
                "table": [dict(summarize(rows[setting_key(*g)]), store=g[0], strategy=g[1],
                               recompute=g[2]) for g in done]}

    for qi, (name, question, by_store, docs) in enumerate(
            p for pair in zip(*prompts) for p in pair):  # alternate: a cut run covers both sets
        segs = {s: rag_segments(tokenizer, store, question, docs, doc_tokens,
                                context=s != "alone", stand_in=s == "standin") for s, store in by_store.items()}
        ids = plan(model, tokenizer, segs[stores[0]], parse_special=True).ids  # template head/tail
        n_chunk = sum(len(s) for s in segs[stores[0]] if not isinstance(s, str))
        cont, ref, first = reference(model, ids, stop=stop)
        colds = [first] + [reference(model, ids, 1)[2] for _ in range(reps - 1)]
        cold = statistics.median(colds)
        questions.append({"set": name, "question": question, "prompt_tokens": len(ids),
                          "cold_ttft_s": cold, "reference": tokenizer.decode(cont)})
        log(f"  {name} Q{qi + 1}: {len(ids)} tokens, cold TTFT {cold:.3f} s, "
            f"reference {tokenizer.decode(cont)!r}")
        for store, strategy, f in grid:
            kw = dict(recompute=f, recompute_strategy=None if strategy in ("none", "auto")
                      else strategy)
            runs = [composed_quality(model, tokenizer, segs[store], cont, ref, **kw)
                    for _ in range(reps)]
            quality, _, recomputed = runs[0]
            reused = statistics.median(r[1] for r in runs)
            rows[setting_key(store, strategy, f)].append(dict(
                vars(quality), ttft_s=reused, cached_tokens=n_chunk - recomputed,
                speedup=cold / reused, recomputed=recomputed / n_chunk))
            log(f"    {setting_key(store, strategy, f)}: TTFT {reused:.3f} s "
                f"({cold / reused:.1f}x), "
                f"agreement {quality.agreement:.2f} of {quality.n}, prefix {quality.prefix}, "
                f"KL {quality.kl:.3f}")
        if progress:
            progress(result())
    return result()


def setting_key(store: str, strategy: str, f) -> str:
    """A setting's name in the results' per-question rows: "standin first 0.20"."""
    return f"{store} " + (strategy if strategy in ("none", "auto") else f"{strategy} {f:.2f}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlxgen bench reuse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="model source (repeatable; default smollm2)")
    p.add_argument("--parts", default="rag,chat", help="comma list of rag, chat (default both)")
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)),
                   help="recompute fractions for the RAG table")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help="recompute strategies for the frontier (comma list; auto is always run)")
    p.add_argument("--stores", default=",".join(STORES),
                   help="how documents are stored: alone (encoded on their own) and/or context "
                   "(encoded after the prompt's template head)")
    p.add_argument("--settings", default="",
                   help="explicit rows instead of the grid: comma list of STORE/none, STORE/auto, "
                   "STORE/STRATEGY/FRACTION (e.g. alone/mixed/0.15,context/auto)")
    p.add_argument("--questions", type=int, default=10, help="questions per document set (2 sets)")
    p.add_argument("--skip-questions", type=int, default=0, help="leave out each set's first "
                   "N questions (extend an earlier run with the next ones)")
    p.add_argument("--docs", default="4", help="documents per prompt, comma list (4: ~2.1k "
                   "tokens, 16: ~8.2k)")
    p.add_argument("--doc-tokens", type=int, default=512)
    p.add_argument("--reps", type=int, default=1, help="TTFT repetitions (median)")
    p.add_argument("--out", default="bench/results", help="results directory")
    return p


def run_cli(argv: Sequence[str]) -> int:
    from .. import load

    args = build_parser().parse_args(list(argv))
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        raise MlxgenError(f"--fractions must be comma-separated numbers; got {args.fractions!r}.")
    parts = set(args.parts.split(","))
    if not parts <= {"rag", "chat"}:
        raise MlxgenError(f"--parts takes rag and/or chat; got {args.parts!r}.")
    strategies = [check_strategy(s) for s in args.strategies.split(",") if s]
    stores = [s for s in args.stores.split(",") if s]
    if not stores or not set(stores) <= set(STORES):
        raise MlxgenError(f"--stores takes {' and/or '.join(STORES)}; got {args.stores!r}.")
    grid = parse_settings(args.settings) or settings_for(fractions, strategies, stores)
    try:
        n_docs = [int(n) for n in args.docs.split(",")]
    except ValueError:
        raise MlxgenError(f"--docs must be comma-separated counts; got {args.docs!r}.")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    for source in args.model or ["smollm2"]:
        result = {"model": source, "load_avg_start": os.getloadavg(), "cpu_count": os.cpu_count(),
                  "device": str(mx.default_device())}
        model, tokenizer = load(source)
        log(f"{source}: {model.model_type}, {len(model.layers)} layers")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = "reuse-" + Path(source).name.replace(":", "_")
        if "rag" in parts and n_docs != [4]:
            name += "-" + "-".join(f"{n}docs" for n in n_docs)
        if "rag" in parts and args.skip_questions:
            name += f"-from-q{args.skip_questions + 1}"
        if "rag" not in parts:
            name += "-chat"

        def save() -> None:  # after each part: a long run keeps what it has measured
            result["load_avg_end"] = os.getloadavg()
            (out / f"{name}.json").write_text(json.dumps(result, indent=1))
            (out / f"{name}.md").write_text(write_report(result))

        if "rag" in parts:
            result["rag"] = []
            for n in n_docs:
                result["rag"].append(None)

                def progress(rag: dict) -> None:
                    result["rag"][-1] = rag
                    save()

                run_rag(model, tokenizer, grid, args.reps, args.questions, args.doc_tokens, n,
                        log, progress, args.skip_questions)
        if "chat" in parts:
            result["chat"] = run_chat(model, tokenizer, log)
            save()
        log(f"wrote {out / name}.json and .md")
        print(write_report(result))
    return 0


def main() -> int:
    try:
        return run_cli(sys.argv[1:])
    except MlxgenError as e:
        print(f"mlxgen bench reuse: error: {e}", file=sys.stderr)
        return 2
