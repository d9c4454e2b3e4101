"""Which text makes the best stand-in document (issue 18, session 13): quality only.

Documents after the first are stored after the head, a stand-in document and the separator
(reuse/stand_in.py). This script swaps the stand-in's text (`after_stand_in`'s `text`) and
compares compositions with the full prefill, the same questions for each text: the library's
note ("note"), a station document not in any prompt ("station50": the
stations set's own kind of text, foreign to the handbook set), a handbook document that is also
in the prompts ("handbook3"), a made-up museum guide with facts of its own ("museum") and a
fact-free essay ("essay", both in bench/standin_texts.py):

    nice python bench/reuse_standin_text.py --model smollm2 --texts note,museum \
        --settings 0,auto,0.15 --questions 5 --skip 0 [--docs 16] [--answers]
"""

from __future__ import annotations

import argparse
import statistics

import mlxgen.bench.reuse_quality as rq
from mlxgen import load
from mlxgen.bench.reuse_data import DOCS, fit
from mlxgen.bench.reuse_docs import doc_sets, station_doc
from mlxgen.reuse import ChunkStore
from mlxgen.reuse.compose import plan
from mlxgen.reuse.stand_in import STAND_IN
from standin_texts import ESSAY, MUSEUM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--texts", default="note,museum")
    p.add_argument("--settings", default="0,auto,0.15", help='"first" shares, or auto')
    p.add_argument("--questions", type=int, default=5, help="per document set")
    p.add_argument("--skip", type=int, default=0, help="start after this many per set")
    p.add_argument("--docs", type=int, default=4, help="documents per prompt (16: ~8.3k tokens)")
    p.add_argument("--answers", action="store_true",
                   help="also print each text's free-running greedy answer at recompute 0 "
                        "(to see a stand-in's facts surface)")
    a = p.parse_args()
    model, tok = load(a.model)
    texts = {"note": STAND_IN, "station50": fit(tok, station_doc(50), 512),
             "handbook3": fit(tok, DOCS[3], 512), "museum": MUSEUM, "essay": ESSAY}
    res: dict = {}
    for ds in doc_sets(a.docs):
        docs = [fit(tok, d, 512) for d in ds.docs]
        for q in ds.questions[a.skip : a.skip + a.questions]:
            print(ds.name, q, flush=True)
            ref = None
            for name in a.texts.split(","):
                segs = rq.rag_segments(tok, ChunkStore(model, tok), q, docs, 512, context=True,
                                       stand_in=texts[name])
                if ref is None:
                    ids = plan(model, tok, segs, parse_special=True).ids
                    cont, ref, _ = rq.reference(model, ids, stop=tok.eos_token_ids)
                for s in a.settings.split(","):
                    qual, _, _ = rq.composed_quality(
                        model, tok, segs, cont, ref, recompute=s if s == "auto" else float(s),
                        recompute_strategy="first")
                    res.setdefault((ds.name, name, s), []).append((qual.agreement, qual.kl))
                if a.answers:
                    cache, logits = plan(model, tok, segs, parse_special=True).run(
                        model, recompute=0.0)
                    out = rq.greedy_continuation(model, cache, logits, 48, tok.eos_token_ids)
                    print(f"  {name}: {tok.decode(out)!r}")
    print(f"{a.model}: agreement mean / min, KL (questions)")
    for subset in [d.name for d in doc_sets(a.docs)] + ["all"]:
        for name in a.texts.split(","):
            for s in a.settings.split(","):
                v = [x for (d, n, t), xs in res.items() for x in xs
                     if n == name and t == s and subset in (d, "all")]
                print(f"{subset} {name} {s}: {statistics.mean(x[0] for x in v):.4f} / "
                      f"{min(x[0] for x in v):.3f}, {statistics.mean(x[1] for x in v):.4f} "
                      f"({len(v)})")


if __name__ == "__main__":
    main()
