"""APE's attention temperature/scale over placed chunks: a quality sweep (issue 18, third session).

Documents stored after the prompt's head (ChunkStore context), 4 x 512 tokens; for each question
the full prefill's reference is computed once, then every (recompute setting, T, S) composition
is compared with it (reuse_quality: teacher-forced agreement, KL over 32 answer tokens). Quality
only: T and S change no work, so no time is measured. Fit on one document set, check on the other:

    nice -n 15 python bench/reuse_ape.py --model smollm2 --set handbook --grid 1:1,0.9:1,0.9:0.7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from mlxgen import load
from mlxgen.bench.reuse_data import fit
from mlxgen.bench.reuse_docs import doc_sets
from mlxgen.bench.reuse_quality import composed_quality, rag_segments, reference
from mlxgen.reuse import ChunkStore
from mlxgen.reuse.compose import plan
from mlxgen.reuse.recompute import Ape


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--set", default="handbook", help="handbook or stations")
    p.add_argument("--questions", type=int, default=10)
    p.add_argument("--settings", default="first/0.05,auto",
                   help="comma list of STRATEGY/FRACTION or auto (context-stored chunks)")
    p.add_argument("--grid", default="1:1,0.9:1,0.8:1,1:0.7,0.9:0.7,0.8:0.7,0.9:1.4",
                   help="comma list of T:S")
    p.add_argument("--out", default="")
    a = p.parse_args()
    grid = [tuple(float(x) for x in item.split(":")) for item in a.grid.split(",")]
    settings = []
    for item in a.settings.split(","):
        if item == "auto":
            settings.append(("auto", dict(recompute="auto")))
        else:
            strategy, f = item.split("/")
            settings.append((item, dict(recompute=float(f), recompute_strategy=strategy)))

    model, tokenizer = load(a.model)
    docset = next(d for d in doc_sets(4) if d.name == a.set)
    docs = [fit(tokenizer, d, 512) for d in docset.docs]
    store = ChunkStore(model, tokenizer)
    rows: dict[str, list[dict]] = {}
    for qi, question in enumerate(docset.questions[: a.questions]):
        segs = rag_segments(tokenizer, store, question, docs, 512, context=True)
        ids = plan(model, tokenizer, segs, parse_special=True).ids
        cont, ref, _ = reference(model, ids, stop=tokenizer.eos_token_ids)
        for name, kw in settings:
            for t, s in grid:
                q, _, _ = composed_quality(model, tokenizer, segs, cont, ref, ape=Ape(t, s), **kw)
                rows.setdefault(f"{name} T={t:g} S={s:g}", []).append(vars(q))
        print(f"Q{qi + 1} done", file=sys.stderr, flush=True)
    table = {k: {"agreement": statistics.mean(r["agreement"] for r in v),
                 "agreement_min": min(r["agreement"] for r in v),
                 "kl": statistics.mean(r["kl"] for r in v),
                 "kl_first": statistics.mean(r["kl_first"] for r in v),
                 "prefix": statistics.mean(r["prefix"] for r in v), "n": len(v)}
             for k, v in rows.items()}
    lines = [f"## APE sweep: {a.model}, {a.set}, {a.questions} questions, context-stored chunks",
             "",
             "| setting | agreement mean / min | mean KL | first-token KL | identical prefix |",
             "|---|---|---|---|---|"]
    for k, r in table.items():
        lines.append(f"| {k} | {r['agreement']:.1%} / {r['agreement_min']:.1%} | {r['kl']:.4f} | "
                     f"{r['kl_first']:.4f} | {r['prefix']:.1f} |")
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "table": table, "rows": rows},
                                          indent=1))


if __name__ == "__main__":
    main()
