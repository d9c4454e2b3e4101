"""Quality of composed (reused) prompts against a full prefill of the same tokens.

Metrics over the full-prefill reference's greedy continuation (32 tokens, or fewer when it ends
with an end-of-turn token first: what follows would never be shown), teacher-forced (both caches
are fed the reference tokens, so one early miss does not cascade):
- agreement: share of those positions whose greedy token matches the reference;
- prefix: tokens generated identically before the first mismatch (what free-running greedy
  decoding would reproduce exactly);
- kl: mean KL(reference || reused) of the next-token distributions over those positions,
  kl_first: the same at the first generated token only;
- first: whether the first generated token matches (what a user sees first).
summarize() reduces per-question results to mean, min and p10 (the spread, not only the mean)."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

from ..cache import make_cache
from ..prefill import prefill
from ..reuse import ChunkStore
from ..reuse.compose import plan
from ..reuse.stand_in import STAND_IN, after_stand_in
from .reuse_data import DOCS, SYSTEM, fit

N_TOKENS = 32


@dataclass
class Quality:
    agreement: float
    prefix: int
    kl: float
    kl_first: float
    n: int  # positions compared
    first: bool = True


def rag_segments(tokenizer, store: ChunkStore, question: str, docs: Sequence[str] = DOCS,
                 doc_tokens: int = 512, system: str = SYSTEM, context: bool = False,
                 stand_in: bool | str = False) -> list:
    """[chat-template head, doc 1, sep, doc 2, ..., question + template tail] with each document
    a stored chunk of exactly `doc_tokens` tokens. The head and tail are rendered template text:
    compose them with parse_special=True. context: store each document after the head (its
    tokens as the prompt's start), so the first document is exact and none is a sink; with
    stand_in, documents after the first are stored after the head, the stand-in document and
    the separator (reuse.stand_in; a str: that text as the stand-in)."""
    marker = "\x00DOCS\x00"
    rendered = tokenizer.apply_chat_template([
        {"role": "system", "content": system},
        {"role": "user", "content": f"Documents:\n\n{marker}\n\nQuestion: {question}"},
    ])
    head, tail = rendered.split(marker)
    head_ids = tokenizer.encode(head, add_special_tokens=True, parse_special=True)
    sep = tokenizer.encode("\n\n", add_special_tokens=False)
    later = after_stand_in(tokenizer, head_ids, sep,
                           stand_in if isinstance(stand_in, str) else STAND_IN)
    segments: list = [head]
    for i, doc in enumerate(docs):
        if i:
            segments.append("\n\n")
        ids = tokenizer.encode(doc, add_special_tokens=False)[:doc_tokens]
        ctx = (later if stand_in and i else head_ids) if context else ()
        segments.append(store.add(ids, context=ctx))
    segments.append(tail)
    return segments


def greedy_continuation(model, cache: list, logits: mx.array, n: int = N_TOKENS,
                        stop: Sequence[int] = ()) -> list[int]:
    """Greedy tokens from a filled cache: n of them, or up to and including a stop token.
    The cache ends up holding all but the last one."""
    out = []
    for _ in range(n):
        out.append(mx.argmax(logits, axis=-1).item())
        if out[-1] in stop or len(out) == n:
            break
        logits = model(mx.array([[out[-1]]]), cache)[:, -1, :]
    return out


def forced_logprobs(
    model, cache: list, last_logits: mx.array, continuation: Sequence[int]
) -> mx.array:
    """Next-token log-probabilities at each continuation position (n, vocab), teacher-forced."""
    logits = last_logits.reshape(1, -1)
    if len(continuation) > 1:
        rest = model(mx.array([list(continuation[:-1])]), cache)[0]
        logits = mx.concatenate([logits, rest])
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def compare(ref: mx.array, got: mx.array, continuation: Sequence[int]) -> Quality:
    picks = mx.argmax(got, axis=-1).tolist()
    target = list(continuation)
    hits = [a == b for a, b in zip(picks, target)]
    prefix = hits.index(False) if False in hits else len(hits)
    kl = (mx.exp(ref) * (ref - got)).sum(axis=-1)
    return Quality(sum(hits) / len(hits), prefix, kl.mean().item(), kl[0].item(), len(hits),
                   hits[0])


def p10(values: Sequence[float]) -> float:
    """The 10th percentile (nearest rank, lower): the value a tenth of the questions fall below."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.1 * len(ordered)) - 1)]


def summarize(rows: Sequence[dict]) -> dict:
    """Per-question rows (Quality fields + ttft_s, speedup, cached_tokens) -> one table row."""
    agree = [r["agreement"] for r in rows]
    mean = lambda key: statistics.mean(float(r[key]) for r in rows)  # noqa: E731
    return {"agreement": statistics.mean(agree), "agreement_min": min(agree),
            "agreement_p10": p10(agree), "prefix": mean("prefix"), "n": mean("n"),
            "first_agreement": mean("first"), "kl": mean("kl"), "kl_max": max(r["kl"] for r in rows),
            "kl_first": mean("kl_first"),
            "ttft_s": statistics.median(r["ttft_s"] for r in rows),
            "speedup": statistics.median(r["speedup"] for r in rows),
            "cached_tokens": mean("cached_tokens"), "recomputed": mean("recomputed")}


def reference(model, ids: Sequence[int], n: int = N_TOKENS, stop: Sequence[int] = ()
              ) -> tuple[list[int], mx.array, float]:
    """Full prefill: (greedy continuation of n tokens or up to a stop token, its teacher-forced
    log-probs, TTFT = prefill + first logits)."""
    start = time.perf_counter()
    cache = make_cache(len(model.layers))
    logits = prefill(model, list(ids), cache)
    mx.eval(logits)
    ttft = time.perf_counter() - start
    cont = greedy_continuation(model, cache, logits, n, stop)
    for c in cache:
        c.trim(c.offset - len(ids))
    ref = forced_logprobs(model, cache, logits, cont)
    mx.eval(ref)
    return cont, ref, ttft


def composed_quality(model, tokenizer, segments: list, continuation: Sequence[int], ref: mx.array,
                     **run_kw) -> tuple[Quality, float, int]:
    """(quality, TTFT of composition + first logits, chunk tokens recomputed) for one segment
    prompt."""
    start = time.perf_counter()
    composition = plan(model, tokenizer, segments, parse_special=True)  # rag_segments: template text
    cache, logits = composition.run(model, **run_kw)
    mx.eval(logits)
    ttft = time.perf_counter() - start
    got = forced_logprobs(model, cache, logits, continuation)
    return compare(ref, got, continuation), ttft, composition.recomputed


def docs_for(tokenizer, n_tokens: int = 512) -> list[str]:
    return [fit(tokenizer, d, n_tokens) for d in DOCS]
