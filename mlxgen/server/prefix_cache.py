"""KV caches of recent requests, reused by the longest common token prefix of the next one.

A stateless client resends its whole conversation each turn; the cache whose tokens share the
longest prefix with the new prompt is reused and only the rest is prefilled (as mlx-lm's server
and Ollama do). Entries are keyed by the model fingerprint, so one model's K/V never serves
another, and kept in an LRU bounded by bytes. Touched only from the worker thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

from ..reuse.session import common_prefix, trim_to_prefix


@dataclass
class _Entry:
    fingerprint: str
    tokens: list[int]  # exactly the tokens whose K/V the cache holds
    cache: list

    @property
    def nbytes(self) -> int:  # allocated, not only filled: what the budget must bound
        return sum(c.keys.nbytes + c.values.nbytes for c in self.cache if c.keys is not None)


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: list[_Entry] = []  # least recently used first
        self._lock = threading.Lock()  # only for readers on other threads (nbytes, stats)
        self.hits = self.misses = 0

    def take(self, fingerprint: str, model, ids: Sequence[int]) -> tuple[list, list[int]]:
        """A cache for the prompt `ids` and the tokens it already holds (a prefix of ids).

        The entry that holds a whole prefix of the prompt (a growing conversation) is taken out
        and extended; one that diverges earlier is copied up to the divergence so that it can
        still serve its own conversation."""
        best, best_n = None, 0
        for e in self._entries:
            if e.fingerprint == fingerprint:
                n = common_prefix(e.tokens, ids)
                if n > best_n:
                    best, best_n = e, n
        keep = min(best_n, len(ids) - 1)
        if best is None or keep <= 0:
            self.misses += 1
            return model.make_cache(), []
        self.hits += 1
        if keep < len(best.tokens) and all(c.start == 0 for c in best.cache):
            return _copy(best.cache, keep), list(ids[:keep])
        with self._lock:
            self._entries.remove(best)
        keep = trim_to_prefix(best.cache, best.tokens, ids)
        return best.cache, list(ids[:keep])

    def put(self, fingerprint: str, tokens: list[int], cache: list) -> None:
        """Keep `cache` (holding `tokens`) as the most recent entry; evict to the budget."""
        if not tokens:
            return
        entry = _Entry(fingerprint, tokens, cache)
        with self._lock:
            # An entry whose tokens all start the new one is served as well by the new one.
            self._entries = [e for e in self._entries if e.fingerprint != fingerprint
                             or common_prefix(e.tokens, tokens) < len(e.tokens)]
            self._entries.append(entry)
            total = sum(e.nbytes for e in self._entries)
            while self._entries and total > self.max_bytes:
                total -= self._entries.pop(0).nbytes

    def drop(self, fingerprint: str) -> None:
        with self._lock:
            self._entries = [e for e in self._entries if e.fingerprint != fingerprint]

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _copy(cache: list, n: int) -> list:
    """New caches of the same kinds holding the first n tokens (for caches that start at 0)."""
    out = []
    for c in cache:
        new = type(c)(c.window, c.keep_all)
        new.update_and_fetch(c.keys[..., :n, :], c.values[..., :n, :])
        out.append(new)
    mx.eval([a for c in out for a in c.state])
    return out
