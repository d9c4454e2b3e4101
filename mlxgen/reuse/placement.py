"""Cache surgery for reuse: placing stored K/V into a cache and rewriting cached tokens in place.

Caches (mlxgen/cache.py) only store and rotate; these functions know the two storage forms:
a standard cache holds keys rotated at their positions, a pre-RoPE cache holds them unrotated.
Positions are absolute; a windowed cache stores positions from `cache.start` on."""

from __future__ import annotations

import mlx.core as mx

from ..cache import KVCache, Rope


def rope_at(x: mx.array, positions: mx.array, rope: Rope) -> mx.array:
    """Rotate each token of x (1, H, m, D) by its own position (positions: m int32 values).

    mx.fast.rope takes one offset per batch row, so tokens are made the batch for one call."""
    return rope(x.transpose(2, 1, 0, 3), positions).transpose(2, 1, 0, 3)


def splice(cache: KVCache, keys: mx.array, values: mx.array, rope: Rope) -> None:
    """Append stored position-independent K/V (pre-RoPE keys) at the cache's offset: token i
    lands at offset + i; a standard cache pays one rotation by the offset, here."""
    cache.update_and_fetch(keys if cache.pre_rope else rope(keys, cache.offset), values)


def write_at(cache: KVCache, positions: mx.array, keys: mx.array, values: mx.array, rope: Rope) -> None:
    """Overwrite already-cached tokens at `positions` with freshly computed (unrotated) K/V."""
    rows = positions - cache.start
    cache.keys[..., rows, :] = keys if cache.pre_rope else rope_at(keys, positions, rope)
    cache.values[..., rows, :] = values


def stored_at(cache: KVCache, positions: mx.array) -> tuple[mx.array, mx.array]:
    """The stored (as stored: pre-RoPE or rotated) keys and values at `positions`."""
    rows = positions - cache.start
    return cache.keys[..., rows, :], cache.values[..., rows, :]


def fetch(cache: KVCache, rope: Rope, n: int | None = None) -> tuple[mx.array, mx.array]:
    """The stored keys of positions start .. n - 1 (default: all), rotated and ready to attend,
    and their values."""
    n = (cache.offset if n is None else n) - cache.start
    keys = cache.keys[..., :n, :]
    return (rope(keys, cache.start) if cache.pre_rope else keys), cache.values[..., :n, :]
