"""The chat part of `mlxgen bench reuse`: per-turn prefill tokens and TTFT, cold vs Session."""

from __future__ import annotations

from ..generate import prompt_tokens, stream_generate
from ..reuse.session import Session
from .reuse_data import CHAT_SYSTEM, CHAT_TURNS, DOCS, fit

REPLY_TOKENS = 50
HISTORY_TOKENS = 2000


def _cold_ttft(model, tokenizer, messages) -> float:
    return next(iter(stream_generate(model, tokenizer, messages, max_tokens=1))).stats.ttft_s


def conversation(model, tokenizer, messages: list[dict], log, label: str,
                 reply_tokens: int = REPLY_TOKENS) -> list[dict]:
    """Play CHAT_TURNS on top of `messages`; the session's replies become the history."""
    session = Session(model, tokenizer)
    messages = list(messages)
    rows = []
    for i, user in enumerate(CHAT_TURNS):
        messages.append({"role": "user", "content": user})
        n = len(prompt_tokens(tokenizer, messages, model.args.vocab_size))
        cold = _cold_ttft(model, tokenizer, messages)
        reply = session.generate(messages, max_tokens=reply_tokens)
        s = session.stats
        rows.append({"turn": i + 1, "prompt_tokens": n, "cold_prefill_tokens": n,
                     "cold_ttft_s": cold, "session_prefill_tokens": s.prefill_tokens,
                     "session_cached_tokens": s.cached_tokens, "session_ttft_s": s.ttft_s,
                     "reply_tokens": s.generation_tokens})
        log(f"  {label} turn {i + 1}: {n} prompt tokens; cold {n} prefilled, TTFT {cold:.3f} s; "
            f"session {s.prefill_tokens} prefilled ({s.cached_tokens} cached), "
            f"TTFT {s.ttft_s:.3f} s")
        messages.append({"role": "assistant", "content": reply})
    return rows


def long_history(tokenizer, target: int = HISTORY_TOKENS) -> list[dict]:
    """System prompt + four earlier turns in which the user shared documents: about `target`
    tokens once rendered."""
    head = [{"role": "system", "content": CHAT_SYSTEM}]
    base = len(tokenizer.encode(tokenizer.apply_chat_template(head), add_special_tokens=False))
    per_doc = (target - base) // len(DOCS) - 30  # ~30 tokens of template, request and reply
    messages = list(head)
    for doc in DOCS:
        messages.append({"role": "user", "content": "Please keep these notes for later:\n\n"
                         + fit(tokenizer, doc, per_doc)})
        messages.append({"role": "assistant", "content": "Noted, I will keep these notes in mind."})
    return messages


def run_chat(model, tokenizer, log) -> dict:
    _cold_ttft(model, tokenizer, [{"role": "user", "content": "Hello"}])  # warm-up
    typical = conversation(model, tokenizer, [{"role": "system", "content": CHAT_SYSTEM}], log,
                           "typical")
    history = long_history(tokenizer)
    n = len(tokenizer.encode(tokenizer.apply_chat_template(history, add_generation_prompt=False),
                             add_special_tokens=False))
    return {"typical": typical, "history_tokens": n,
            "long_history": conversation(model, tokenizer, history, log, "2k-history")}
