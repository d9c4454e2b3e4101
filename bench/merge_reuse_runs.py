"""Merge `mlxgen bench reuse` result files of the same model and prompt size, e.g. a run and its
extension with `--skip-questions`, into one table over all their questions.

    python bench/merge_reuse_runs.py OUT.json RUN1.json RUN2.json ...

Settings are kept where every run measured them (their rows over every run's questions); a
setting missing from a run is dropped. Writes OUT.json and OUT.md (the same report as the bench).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from mlxgen.bench.reuse import setting_key
from mlxgen.bench.reuse_quality import summarize
from mlxgen.bench.reuse_report import write_report


def _key(row: dict) -> str:
    return setting_key(row["store"], row["strategy"], row["recompute"])


def merge(results: list[dict]) -> dict:
    rags = [r["rag"][0] for r in results]
    if len({(r["model"], g["n_docs"], g["doc_tokens"]) for r, g in zip(results, rags)}) != 1:
        raise SystemExit("the runs differ in model, document count or document size.")
    rows = [t for t in rags[0]["table"] if all(_key(t) in g["per_question"] for g in rags)]
    questions = [q for g in rags for q in g["questions"]]
    per_question = {_key(t): [x for g in rags for x in g["per_question"][_key(t)]] for t in rows}
    table = [dict(summarize(per_question[_key(t)]), store=t["store"], strategy=t["strategy"],
                  recompute=t["recompute"]) for t in rows]
    rag = dict(rags[0], questions=questions, per_question=per_question, table=table,
               cold_ttft_s=statistics.median(q["cold_ttft_s"] for q in questions),
               merged_from=len(results))
    return dict(results[0], rag=[rag], load_avg_end=results[-1].get("load_avg_end"))


def main() -> None:
    out, *runs = sys.argv[1:]
    merged = merge([json.loads(Path(p).read_text()) for p in runs])
    Path(out).write_text(json.dumps(merged, indent=1))
    Path(out).with_suffix(".md").write_text(write_report(merged))
    print(write_report(merged))


if __name__ == "__main__":
    main()
