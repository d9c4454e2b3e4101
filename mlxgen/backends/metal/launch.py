"""Building and launching the kernels: grids, tiles, splits and parameter arrays.

Everything here is backend-neutral: `factory` is `mx.fast.metal_kernel` on a Mac and
`mlxgen.emulation.metal_kernel` in CI, so the emulator exercises this exact launch code."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

from .reference import RopeParams
from ..sources import read_source

Factory = Callable[..., Callable]

LOG2E = 1.4426950408889634
SIMD = 32
MAX_ROWS = 8          # query rows per threadgroup (registers: 2*ROWS*D/32 floats per lane)
NSG = 4               # simdgroups per decode threadgroup
MIN_KEYS_PER_SPLIT = 256
TARGET_THREADGROUPS = 128  # enough to fill the GPU cores of the largest Apple parts


@dataclass(frozen=True)
class KernelSpec:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    source: str
    header: str = ""


ROPE = KernelSpec("mlxgen_rope", ("q", "k", "inv_freq", "offsets", "params"),
                  ("q_out", "k_out"), "rope.metal", "rope_common.h")
DECODE = KernelSpec("mlxgen_attn_decode_prerope",
                    ("q", "k", "v", "inv_freq", "params", "fparams"),
                    ("out", "o_part", "ml_part"), "attn_decode.metal", "rope_common.h")
REDUCE = KernelSpec("mlxgen_attn_reduce", ("o_part", "ml_part", "params"), ("out",),
                    "attn_reduce.metal")
SPECS = (ROPE, DECODE, REDUCE)

# (factory id, kernel) -> (factory, kernel): holding the factory keeps its id from being reused.
_BUILT: dict[tuple[int, str], tuple[Factory, Callable]] = {}


def build(spec: KernelSpec, factory: Factory) -> Callable:
    """Each kernel is built once per factory; MLX then caches each template instantiation."""
    key = (id(factory), spec.name)
    if key not in _BUILT:
        header = read_source(spec.header) if spec.header else ""
        _BUILT[key] = (factory, factory(name=spec.name, input_names=list(spec.inputs),
                                        output_names=list(spec.outputs),
                                        source=read_source(spec.source), header=header))
    return _BUILT[key][1]


def _offsets(offset: int | mx.array, batch: int) -> mx.array:
    off = mx.array(offset, dtype=mx.int32) if not isinstance(offset, mx.array) else offset.astype(mx.int32)
    return mx.broadcast_to(off.reshape(-1), (batch,)) if off.size == 1 else off.reshape(batch)


def rope_kernel(q: mx.array, k: mx.array, rope: RopeParams, offset: int | mx.array,
                factory: Factory, k_dtype: mx.Dtype | None = None) -> tuple[mx.array, mx.array]:
    """Rotate q (B, Hq, L, D) and k (B, Hk, L, D) at positions offset + l in one dispatch."""
    B, Hq, L, D = q.shape
    Hk = k.shape[1]
    k_dtype = k_dtype or k.dtype
    params = mx.array([Hq, Hk, L, D, rope.dims, int(rope.traditional)], dtype=mx.int32)
    return tuple(build(ROPE, factory)(
        inputs=[q, k.astype(q.dtype), rope.inv_freq(), _offsets(offset, B), params],
        template=[("T", q.dtype), ("TK", k_dtype)],
        grid=(D // 2, L, B * (Hq + Hk)), threadgroup=(D // 2, 1, 1),
        output_shapes=[q.shape, k.shape], output_dtypes=[q.dtype, k_dtype]))


@dataclass(frozen=True)
class DecodePlan:
    rows: int        # ROWS template argument
    tiles: int       # row tiles per kv head
    splits: int      # sequence splits (threadgroups along the keys)
    keys_per_split: int


def plan_decode(batch: int, kv_heads: int, group: int, lq: int, n_keys: int) -> DecodePlan:
    """Rows per threadgroup: the GQA group's queries, up to MAX_ROWS (a power of two). Splits:
    enough threadgroups to fill the GPU, but at least MIN_KEYS_PER_SPLIT keys each."""
    rows_needed = group * lq
    rows = min(MAX_ROWS, 1 << (rows_needed - 1).bit_length())
    tiles = math.ceil(rows_needed / rows)
    base = batch * kv_heads * tiles
    splits = max(1, min(math.ceil(TARGET_THREADGROUPS / base), n_keys // MIN_KEYS_PER_SPLIT))
    kps = math.ceil(math.ceil(n_keys / splits) / SIMD) * SIMD
    return DecodePlan(rows, tiles, math.ceil(n_keys / kps), kps)


def decode_kernel(q: mx.array, k_cache: mx.array, v_cache: mx.array, n_keys: int,
                  rope: RopeParams, scale: float, factory: Factory, pos0: int = 0,
                  plan: DecodePlan | None = None) -> mx.array:
    """Attention of q (B, Hq, Lq, D), unrotated, over the first n_keys pre-RoPE cached keys."""
    B, Hq, Lq, D = q.shape
    Hk, cap = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hk
    plan = plan or plan_decode(B, Hk, G, Lq, n_keys)
    rows_total = B * Hq * Lq
    params = mx.array([n_keys, cap, Lq, G, Hk, pos0, plan.keys_per_split, int(rope.traditional),
                       plan.splits, rows_total], dtype=mx.int32)
    fparams = mx.array([scale * LOG2E], dtype=mx.float32)
    dt = k_cache.dtype
    split = plan.splits > 1
    out, o_part, ml_part = build(DECODE, factory)(
        inputs=[q.astype(dt), k_cache, v_cache.astype(dt), rope.inv_freq(), params, fparams],
        template=[("T", dt), ("D", D), ("ROWS", plan.rows), ("NSG", NSG)],
        grid=(SIMD * NSG * plan.splits, plan.tiles, B * Hk), threadgroup=(SIMD * NSG, 1, 1),
        output_shapes=[(1,) if split else q.shape, (plan.splits, rows_total, D) if split else (1,),
                       (plan.splits, rows_total, 2) if split else (1,)],
        output_dtypes=[dt, mx.float32, mx.float32])
    if split:
        out = build(REDUCE, factory)(
            inputs=[o_part, ml_part, mx.array([plan.splits, rows_total], dtype=mx.int32)],
            template=[("T", dt), ("D", D)], grid=(SIMD, rows_total, 1), threadgroup=(SIMD, 1, 1),
            output_shapes=[q.shape], output_dtypes=[dt])[0]
    return out.astype(q.dtype)


def decode_supported(q: mx.array, k_cache: mx.array, rope: RopeParams) -> str | None:
    """None when the decode kernel handles these shapes, else why not."""
    B, Hq, Lq, D = q.shape
    if not 1 <= Lq <= 8:
        return f"query length {Lq} (the decode kernel takes 1-8)"
    if D % 64 or D > 128:
        return f"head dim {D} (the decode kernel takes 64 or 128)"
    if rope.dims != D:
        return f"partial RoPE ({rope.dims} of {D} dims)"
    if Hq % k_cache.shape[1]:
        return f"{Hq} query heads over {k_cache.shape[1]} kv heads"
    if k_cache.dtype not in (mx.float32, mx.float16, mx.bfloat16):
        return f"cache dtype {k_cache.dtype}"
    if k_cache.shape[2] * D >= 2**31:
        return "a cache head of 2^31 elements or more"
    return None
