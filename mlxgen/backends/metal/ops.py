"""The two public ops. Each runs the custom kernel or the MLX composition, as dispatch decides."""

from __future__ import annotations

import logging

import mlx.core as mx

from .dispatch import KernelDispatch, bucket, get_dispatch
from .launch import decode_kernel, decode_supported, rope_kernel
from .reference import RopeParams, decode_attention_composition, rope_composition

log = logging.getLogger("mlxgen")

# Prefill chunks longer than this are timed at first use; shorter ones (decode steps) only
# look up decisions taken at load (mlxgen/backends/metal/__init__.py).
DECODE_ROWS = 8


def synthetic(*shapes_and_dtypes: tuple[tuple[int, ...], mx.Dtype]) -> list[mx.array]:
    """Random inputs, evaluated before any timing so the benchmark times only the op."""
    key = mx.random.key(0)  # fixed: a decision never depends on the global random state
    out = [mx.random.normal(shape, key=k).astype(dtype)
           for (shape, dtype), k in zip(shapes_and_dtypes, mx.random.split(key, len(shapes_and_dtypes)))]
    mx.eval(out)
    return out


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
        if choose_rope(d, q.shape, k.shape[1], rp, q.dtype, k.dtype, kd, measure=q.shape[2] > DECODE_ROWS):
            return rope_kernel(q, k, rp, offset, d.factory, kd)
    return rope_composition(q, k, rp, offset, kd)


def decode_attention_prerope(q: mx.array, k_cache: mx.array, v_cache: mx.array, n_keys: int,
                             rope, scale: float, *, pos0: int = 0, kernels: str | None = None,
                             dispatch: KernelDispatch | None = None) -> mx.array:
    """Attention for 1-8 new queries over a pre-RoPE cache: the kernel where a decision taken
    before generation (choose_decode, at load) picked it, else the MLX composition.

    q (B, Hq, Lq, D): the new queries, *unrotated*. k_cache, v_cache (B, Hk, capacity, D): the
    cache buffers, whose first n_keys entries are valid (the new tokens' keys included), keys
    unrotated. Key j sits at position pos0 + j; query i at pos0 + n_keys - Lq + i and attends
    keys up to its own position. Returns (B, Hq, Lq, D) in q's dtype.

    Pass the whole cache buffer, not a slice: the kernel reads only the first n_keys rows,
    while a sliced view would be copied to make it contiguous."""
    rp = RopeParams.from_rope(rope)
    d = dispatch or get_dispatch(kernels)
    why_not = decode_supported(q, k_cache, rp) if d.enabled else "kernels disabled"
    if why_not is None and choose_decode(d, q.shape, k_cache.shape[1], n_keys, rp, scale, q.dtype,
                                         k_cache.dtype, measure=False):
        return decode_kernel(q, k_cache, v_cache, n_keys, rp, scale, d.factory, pos0)
    elif d.mode == "on":
        log.debug("mlxgen kernels: decode attention falls back to the composition: %s", why_not)
    return decode_attention_composition(q, k_cache, v_cache, n_keys, rp, scale, pos0)


def choose_rope(d: KernelDispatch, q_shape, kv_heads: int, rp: RopeParams, dtype: mx.Dtype,
                k_dtype: mx.Dtype, out_k_dtype: mx.Dtype, measure: bool = True) -> bool:
    """The fused RoPE kernel or the composition for this shape (length bucketed)."""
    B, Hq, L, D = q_shape
    Lb = bucket(L)
    key = f"B{B}-Hq{Hq}-Hk{kv_heads}-L{Lb}-D{D}-{rp.key()}-{dtype}-{out_k_dtype}"
    if not measure:
        return d.choose("rope", key, None, None, measure=False)
    q, k = synthetic(((B, Hq, Lb, D), dtype), ((B, kv_heads, Lb, D), k_dtype))
    return d.choose("rope", key, lambda: rope_kernel(q, k, rp, 7, d.factory, out_k_dtype),
                    lambda: rope_composition(q, k, rp, 7, out_k_dtype))


def choose_decode(d: KernelDispatch, q_shape, kv_heads: int, n_keys: int, rp: RopeParams,
                  scale: float, dtype: mx.Dtype, cache_dtype: mx.Dtype, measure: bool = True) -> bool:
    """The decode kernel or the composition for this shape (context bucketed)."""
    B, Hq, Lq, D = q_shape
    nb = bucket(n_keys, 256)
    key = f"B{B}-Hq{Hq}-Hk{kv_heads}-Lq{Lq}-D{D}-n{nb}-{rp.key()}-{cache_dtype}"
    if not measure:
        return d.choose("decode_prerope", key, None, None, measure=False)
    q, k, v = synthetic((q_shape, dtype), ((B, kv_heads, nb, D), cache_dtype),
                        ((B, kv_heads, nb, D), cache_dtype))
    return d.choose("decode_prerope", key, lambda: decode_kernel(q, k, v, nb, rp, scale, d.factory),
                    lambda: decode_attention_composition(q, k, v, nb, rp, scale))
