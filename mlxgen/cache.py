"""Key/value caches. RoPE is applied by the cache's `rotate_and_update`, the seam where the cache
mode decides when keys are rotated (and a fused kernel may later rotate inside attention):

- KVCache (standard, mlx-lm's behaviour): keys are stored rotated at their positions.
- PreRopeKVCache: keys are stored as projected (after Qwen3's k_norm), before rotation, and rotated
  when attended. RoPE is the identity at position 0, so these are "keys encoded at position 0":
  position-independent K/V that can be placed anywhere (mlxgen/reuse)."""

from __future__ import annotations

from typing import Callable, Literal

import mlx.core as mx

from . import settings

Rope = Callable[[mx.array, "int | mx.array"], mx.array]
Mask = Literal["causal"] | mx.array | None


class KVCache:
    """Post-RoPE cache (mlx-lm's behaviour): keys are stored already rotated.

    Storage grows in steps of `step` tokens so appending a chunk is a slice update, not a concat."""

    step = 256
    pre_rope = False

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def rotate_and_update(
        self, queries: mx.array, keys: mx.array, values: mx.array, rope: Rope
    ) -> tuple[mx.array, mx.array, mx.array]:
        """Rotate q/k by the current offset, append k/v; return (queries, all keys, all values)."""
        queries, keys = rope.pair(queries, keys, self.offset)
        keys, values = self.update_and_fetch(keys, values)
        return queries, keys, values

    def attention_mask(self, n_queries: int) -> Mask:
        """Mask for the queries just passed to rotate_and_update (the last cached tokens)."""
        return "causal" if n_queries > 1 else None

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


class PreRopeKVCache(KVCache):
    """Pre-RoPE cache: stores unrotated keys, rotates all of them when attending.

    Same storage, growth and trimming as KVCache; only where the rotation happens differs. On
    Metal a decode kernel may rotate the keys in registers instead (mlxgen/backends/metal)."""

    pre_rope = True

    def rotate_and_update(
        self, queries: mx.array, keys: mx.array, values: mx.array, rope: Rope
    ) -> tuple[mx.array, mx.array, mx.array]:
        queries = rope(queries, self.offset)
        keys, values = self.update_and_fetch(keys, values)
        # Token j's stored key is its key at position 0; rope(keys, 0) rotates it to position j.
        return queries, rope(keys, 0), values


CACHE_CLASSES = {"standard": KVCache, "pre-rope": PreRopeKVCache}


def make_cache(num_layers: int, mode: str | None = None, default: str = "standard") -> list[KVCache]:
    """One cache per layer; mode "standard" or "pre-rope" (else MLXGEN_CACHE_MODE, else default)."""
    cls = CACHE_CLASSES[settings.cache_mode(mode, default)]
    return [cls() for _ in range(num_layers)]
