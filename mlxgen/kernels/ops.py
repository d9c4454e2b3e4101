"""The two public ops. Each runs the custom kernel or the MLX composition, as dispatch decides."""

from __future__ import annotations

import logging

import mlx.core as mx

from .dispatch import KernelDispatch, bucket, get_dispatch
from .launch import decode_kernel, decode_supported, rope_kernel
from .reference import RopeParams, decode_attention_composition, rope_composition

log = logging.getLogger("mlxgen")


def _normal(shape, dtype) -> mx.array:
    return mx.random.normal(shape).astype(dtype)


def fused_rope(q: mx.array, k: mx.array, rope, offset: int | mx.array = 0, *,
               k_dtype: mx.Dtype | None = None, kernels: str | None = None,
               dispatch: KernelDispatch | None = None) -> tuple[mx.array, mx.array]:
    """RoPE for q (B, Hq, L, D) and k (B, Hk, L, D) at positions offset + l (offset: int, or an
    int array of 1 or B entries). k comes back in `k_dtype` (default: k's), ready for the cache.

    `rope`: an mlxgen RoPE module or RopeParams (default, linear and llama3 tables alike)."""
    rp = RopeParams.from_rope(rope)
    d = dispatch or get_dispatch(kernels)
    kd = k_dtype or k.dtype
    if d.enabled and q.shape[-1] % 2 == 0 and (q.shape[-1] - rp.dims) % 2 == 0:
        B, Hq, L, D = q.shape
        Hk = k.shape[1]
        Lb = bucket(L)
        key = f"B{B}-Hq{Hq}-Hk{Hk}-L{Lb}-D{D}-{rp.key()}-{q.dtype}-{kd}"

        def synthetic():
            return _normal((B, Hq, Lb, D), q.dtype), _normal((B, Hk, Lb, D), k.dtype)

        if d.choose("rope", key, lambda: rope_kernel(*synthetic(), rp, 7, d.factory, kd),
                    lambda: rope_composition(*synthetic(), rp, 7, kd)):
            return rope_kernel(q, k, rp, offset, d.factory, kd)
    return rope_composition(q, k, rp, offset, kd)


def decode_attention_prerope(q: mx.array, k_cache: mx.array, v_cache: mx.array, n_keys: int,
                             rope, scale: float, *, pos0: int = 0, kernels: str | None = None,
                             dispatch: KernelDispatch | None = None) -> mx.array:
    """Attention for 1-8 new queries over a pre-RoPE cache.

    q (B, Hq, Lq, D): the new queries, *unrotated*. k_cache, v_cache (B, Hk, capacity, D): the
    cache buffers, whose first n_keys entries are valid (the new tokens' keys included), keys
    unrotated. Key j sits at position pos0 + j; query i at pos0 + n_keys - Lq + i and attends
    keys up to its own position. Returns (B, Hq, Lq, D) in q's dtype.

    Pass the whole cache buffer, not a slice: the kernel reads only the first n_keys rows,
    while a sliced view would be copied to make it contiguous."""
    rp = RopeParams.from_rope(rope)
    d = dispatch or get_dispatch(kernels)
    why_not = decode_supported(q, k_cache, rp) if d.enabled else "kernels disabled"
    if why_not is None:
        B, Hq, Lq, D = q.shape
        Hk = k_cache.shape[1]
        nb = bucket(n_keys, 256)
        key = f"B{B}-Hq{Hq}-Hk{Hk}-Lq{Lq}-D{D}-n{nb}-{rp.key()}-{k_cache.dtype}"

        def synthetic():
            kv = (B, Hk, nb, D)
            return (_normal(q.shape, q.dtype), _normal(kv, k_cache.dtype),
                    _normal(kv, v_cache.dtype))

        if d.choose("decode_prerope", key,
                    lambda: decode_kernel(*synthetic(), nb, rp, scale, d.factory),
                    lambda: decode_attention_composition(*synthetic(), nb, rp, scale)):
            return decode_kernel(q, k_cache, v_cache, n_keys, rp, scale, d.factory, pos0)
    elif d.mode == "on":
        log.debug("mlxgen kernels: decode attention falls back to the composition: %s", why_not)
    return decode_attention_composition(q, k_cache, v_cache, n_keys, rp, scale, pos0)
