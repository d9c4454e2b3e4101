"""Key/value caches. RoPE is applied by the cache's `rotate_and_update`, the seam where the
cache mode (post-RoPE now, pre-RoPE later) and fused kernels decide when keys are rotated."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

Rope = Callable[[mx.array, int], mx.array]


class KVCache:
    """Post-RoPE cache (mlx-lm's behaviour): keys are stored already rotated.

    Storage grows in steps of `step` tokens so appending a chunk is a slice update, not a concat."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def rotate_and_update(
        self, queries: mx.array, keys: mx.array, values: mx.array, rope: Rope
    ) -> tuple[mx.array, mx.array, mx.array]:
        """Rotate q/k by the current offset, append k/v; return (queries, all keys, all values)."""
        queries = rope(queries, self.offset)
        keys, values = self.update_and_fetch(rope(keys, self.offset), values)
        return queries, keys, values

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev = self.offset
        n = keys.shape[2]
        if self.keys is None or prev + n > self.keys.shape[2]:
            self._grow(keys, values, prev + n)
        self.offset += n
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        B, H, _, Dk = keys.shape
        Dv = values.shape[3]
        size = ((needed + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((B, H, size, Dk), keys.dtype)
        new_v = mx.zeros((B, H, size, Dv), values.dtype)
        if self.keys is not None and self.offset > 0:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    @property
    def state(self) -> list[mx.array]:
        """The arrays to evaluate after a prefill chunk (only the filled part)."""
        if self.keys is None:
            return []
        return [self.keys, self.values]

    def trim(self, n: int) -> int:
        """Drop the last `n` cached tokens (e.g. when a conversation diverges); returns how many."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return (self.keys.nbytes + self.values.nbytes) * self.offset // self.keys.shape[2]


def make_cache(num_layers: int) -> list[KVCache]:
    return [KVCache() for _ in range(num_layers)]
