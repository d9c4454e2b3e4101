"""Benchmark prompts of an exact token count, each with a unique beginning.

Servers keep prefix caches (Ollama's cuts TTFT ~20x on a repeated prefix while still reporting
the full prompt_eval_count), so every request starts with a fresh nonce: no cache can serve it."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

FILLER = (
    "The river town woke slowly in the grey light of an autumn morning. Bakers carried trays of "
    "bread across the square, and the ferry captain checked the ropes before the first crossing. "
    "Children ran along the stone wall by the water, counting the boats that had come in during "
    "the night. An old clock above the library struck seven, a little late as always, and the "
    "market stalls opened one after another: apples and pears, wool and leather, maps, brass "
    "lamps and jars of honey from the hills. Travellers asked for directions to the bridge, the "
    "museum and the station, and the shopkeepers answered with long stories about the weather, "
    "the harvest and the year the river froze. By noon the square was full of voices, music and "
    "the smell of roasted chestnuts, and nobody remembered the quiet of the early hours. "
)

_counter = itertools.count()


@dataclass(frozen=True)
class Prompt:
    text: str  # what a server receives
    ids: list[int]  # our tokenizer's encoding of `text` (special tokens included)
    nonce: str

    @property
    def tokens(self) -> int:
        return len(self.ids)


def new_nonce() -> str:
    """A short string no earlier request started with (counter + random bits)."""
    # Random bits first: a prefix cache shares nothing beyond the BOS token.
    return f"{os.urandom(4).hex()}-{next(_counter)}: "


def special_token_count(tokenizer) -> int:
    """Tokens `encode` adds around any text (a BOS, usually): they count toward the length."""
    return len(tokenizer.encode("hello")) - len(tokenizer.encode("hello", add_special_tokens=False))


def build_prompt(tokenizer, n_tokens: int, nonce: str | None = None) -> Prompt:
    """Text that `tokenizer` encodes to exactly `n_tokens` ids (BOS included), starting with a
    unique nonce. Cut at the token level, decoded, then re-checked: decoding and re-encoding can
    merge tokens at the cut, so the cut moves until the round trip gives the requested count."""
    nonce = nonce if nonce is not None else new_nonce()
    specials = special_token_count(tokenizer)
    head = len(tokenizer.encode(nonce, add_special_tokens=False))
    if n_tokens < specials + head + 1:
        raise ValueError(
            f"a {n_tokens}-token prompt is too short: the unique prefix alone takes "
            f"{specials + head} tokens; use at least {specials + head + 1}."
        )
    body = nonce + FILLER
    content = tokenizer.encode(body, add_special_tokens=False)
    while len(content) < n_tokens + 16:
        body += FILLER
        content = tokenizer.encode(body, add_special_tokens=False)
    k = n_tokens - specials
    best: tuple[int, str, list[int]] | None = None
    for _ in range(12):
        text = tokenizer.decode(content[:k])
        ids = tokenizer.encode(text)
        miss = n_tokens - len(ids)
        if best is None or abs(miss) < abs(best[0]):
            best = (miss, text, ids)
        if miss == 0:
            break
        # A cut between two pieces that merge shifts the count; a single step avoids
        # oscillating around a merge.
        k += 1 if miss > 0 else -1
    _, text, ids = best
    return Prompt(text, ids, nonce)


def prompts_are_unique(prompts: list[Prompt], prefix_tokens: int = 4) -> bool:
    """No two prompts share their first `prefix_tokens` ids (a prefix cache needs a shared start)."""
    heads = [tuple(p.ids[:prefix_tokens]) for p in prompts]
    return len(set(heads)) == len(heads)
