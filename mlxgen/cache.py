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


def rope_at(x: mx.array, positions: mx.array, rope: Rope) -> mx.array:
    """Rotate each token of x (1, H, m, D) by its own position (positions: m int32 values).

    mx.fast.rope takes one offset per batch row, so tokens are made the batch for one call."""
    return rope(x.transpose(2, 1, 0, 3), positions).transpose(2, 1, 0, 3)


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
        queries = rope(queries, self.offset)
        keys, values = self.update_and_fetch(rope(keys, self.offset), values)
        return queries, keys, values

    def fused_attention(
        self, queries: mx.array, keys: mx.array, values: mx.array, rope: Rope, scale: float
    ) -> mx.array | None:
        """Attention by a custom kernel instead of rotate_and_update + sdpa, or None (no kernel
        for this cache: the caller goes the usual way)."""
        return None

    def attention_mask(self, n_queries: int) -> Mask:
        """Mask for the queries just passed to rotate_and_update (the last cached tokens)."""
        return "causal" if n_queries > 1 else None

    def splice(self, keys: mx.array, values: mx.array, rope: Rope) -> None:
        """Append stored position-independent K/V (pre-RoPE keys) at the current offset:
        one rotation by the offset (token i lands at offset + i)."""
        self.update_and_fetch(rope(keys, self.offset), values)

    def write_at(self, positions: mx.array, keys: mx.array, values: mx.array, rope: Rope) -> None:
        """Overwrite already-cached tokens at `positions` with freshly computed (unrotated) K/V."""
        self.keys[..., positions, :] = rope_at(keys, positions, rope)
        self.values[..., positions, :] = values

    def fetch(self, rope: Rope, n: int | None = None) -> tuple[mx.array, mx.array]:
        """The first n (default: all) cached keys, rotated and ready to attend, and values."""
        n = self.offset if n is None else n
        return self.keys[..., :n, :], self.values[..., :n, :]

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

    Same storage, growth and trimming as KVCache; only where the rotation happens differs. A fused
    kernel that rotates keys in registers replaces `rotate_and_update` + sdpa for this class."""

    pre_rope = True

    def rotate_and_update(
        self, queries: mx.array, keys: mx.array, values: mx.array, rope: Rope
    ) -> tuple[mx.array, mx.array, mx.array]:
        queries = rope(queries, self.offset)
        keys, values = self.update_and_fetch(keys, values)
        # Token j's stored key is its key at position 0; rope(keys, 0) rotates it to position j.
        return queries, rope(keys, 0), values

    def fused_attention(
        self, queries: mx.array, keys: mx.array, values: mx.array, rope: Rope, scale: float
    ) -> mx.array | None:
        # Decode steps (1-8 queries) go to mlxgen.kernels where custom kernels can run (Metal):
        # it rotates keys in registers, or keeps the MLX composition where that measured faster.
        n = queries.shape[2]
        if n > 8 or self.attention_mask(n) not in ("causal", None):
            return None
        from .kernels import decode_attention_prerope, get_dispatch

        if not get_dispatch().enabled:
            return None
        self.update_and_fetch(keys, values)
        # Whole buffers, not slices: the kernel reads the first `offset` rows without a copy.
        return decode_attention_prerope(queries, self.keys, self.values, self.offset, rope, scale)

    def splice(self, keys: mx.array, values: mx.array, rope: Rope) -> None:
        self.update_and_fetch(keys, values)  # already in stored form: nothing to rotate

    def write_at(self, positions: mx.array, keys: mx.array, values: mx.array, rope: Rope) -> None:
        self.keys[..., positions, :] = keys
        self.values[..., positions, :] = values

    def fetch(self, rope: Rope, n: int | None = None) -> tuple[mx.array, mx.array]:
        n = self.offset if n is None else n
        return rope(self.keys[..., :n, :], 0), self.values[..., :n, :]


CACHE_CLASSES = {"standard": KVCache, "pre-rope": PreRopeKVCache}


def make_cache(num_layers: int, mode: str | None = None) -> list[KVCache]:
    """One cache per layer; mode "standard" or "pre-rope" (default: MLXGEN_CACHE_MODE)."""
    cls = CACHE_CLASSES[settings.cache_mode(mode)]
    return [cls() for _ in range(num_layers)]
