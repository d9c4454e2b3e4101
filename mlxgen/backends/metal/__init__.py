"""What runs on a Mac: MLX's own fused ops (mx.fast.*), plus our Metal kernels (sources in the
repo's kernels/) where a measurement on this device says they win.

- `fused_rope`: RoPE for q and k in one launch (prefill chunks, decode steps).
- `decode_attention_prerope`: attention for 1-8 queries over a pre-RoPE key cache, each key
  rotated in registers while it is read.

`install(model)` runs at load: it times each kernel against MLX's composition on identical
synthetic inputs for the model's decode shapes (once per device and shape; decisions persist in
<cache>/kernel-decisions.json), swaps in the kernel layers (layers.py), and makes the pre-RoPE
cache the model's default where the decode kernel won at every context length. Longer prefill
chunks are timed at their first use; a decode step never times anything. `kernels="auto" | "off"
| "on"` (or MLXGEN_KERNELS). See kernels/README.md."""

from __future__ import annotations

import logging

import mlx.core as mx

from ...runtime import GPU_CHUNK, Runtime
from ..swap import plug, swap
from .bench import bench_kernels, format_table, main
from .dispatch import KernelDispatch, bucket, get_dispatch, microbenchmark
from .launch import DecodePlan, decode_kernel, decode_supported, plan_decode, rope_kernel
from .layers import SWAPS
from .memory import wired_limit
from .mode import MODES, resolve_mode, unavailable_reason
from .ops import DECODE_ROWS, choose_decode, choose_rope, decode_attention_prerope, fused_rope
from .reference import RopeParams, decode_attention_composition, rope_composition

log = logging.getLogger("mlxgen")

MAX_DECIDED_CONTEXT = 1 << 17  # decode decisions are taken for context buckets up to this


def decide(model, dispatch: KernelDispatch) -> dict[str, bool]:
    """Time the kernels for this model's decode shapes (bucketed context lengths up to its
    context) and its decode-step RoPE; returns {"decode <bucket>" / "rope <rows>": kernel?}."""
    args = model.args
    rope = RopeParams.from_rope(model.layers[0].self_attn.rope)
    dtype = model.model.norm.weight.dtype
    q_shape = (1, args.num_attention_heads, 1, args.head_dim)
    picks = {}
    k_probe = mx.zeros((1, args.num_key_value_heads, 1, args.head_dim), dtype)
    if decode_supported(mx.zeros(q_shape, dtype), k_probe, rope) is None:
        last = bucket(min(args.max_position_embeddings, MAX_DECIDED_CONTEXT), 256)
        n = 256
        while n <= last:
            picks[f"decode {n}"] = choose_decode(dispatch, q_shape, args.num_key_value_heads, n, rope,
                                                 args.head_dim**-0.5, dtype, dtype)
            n *= 2
    for rows in (1, 2, 4, 8):
        picks[f"rope {rows}"] = choose_rope(dispatch, (1, args.num_attention_heads, rows, args.head_dim),
                                            args.num_key_value_heads, rope, dtype, dtype, dtype)
    return picks


def install(model, dispatch: KernelDispatch | None = None) -> Runtime:
    """Put our kernels where they measured faster on this device; returns how the model runs."""
    d = dispatch or get_dispatch()
    cache_mode = "standard"
    if d.enabled:
        picks = decide(model, d)
        swap(model, SWAPS)
        for cls in SWAPS.values():
            plug(model, cls, "dispatch", d)
        decode = [v for k, v in picks.items() if k.startswith("decode")]
        if decode and all(decode):
            cache_mode = "pre-rope"  # the decode kernel needs unrotated cached keys
        log.info("mlxgen kernels on %s: %s; default cache %s", d.device, picks, cache_mode)
    return Runtime(backend="metal", prefill_chunk_size=GPU_CHUNK, cache_mode=cache_mode,
                   clear_cache_between_chunks=True, wired_limit=True)


__all__ = [
    "DECODE_ROWS", "MODES", "DecodePlan", "KernelDispatch", "RopeParams", "bench_kernels",
    "choose_decode", "choose_rope", "decide", "decode_attention_composition",
    "decode_attention_prerope", "decode_kernel", "format_table", "fused_rope", "get_dispatch",
    "install", "main", "microbenchmark", "plan_decode", "resolve_mode", "rope_composition",
    "rope_kernel", "unavailable_reason", "wired_limit",
]
