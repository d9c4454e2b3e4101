"""Custom Metal kernels (sources in kernels/) and the dispatch that decides when to use them.

- `fused_rope`: RoPE for q and k in one pass.
- `decode_attention_prerope`: attention for 1-8 queries over a pre-RoPE key cache, each key
  rotated in registers while it is read.

`kernels="auto" | "off" | "on"` (or MLXGEN_KERNELS). "auto" uses a kernel only where one can
run (a Metal GPU) and only after an on-device micro-benchmark shows it beats the MLX
composition for that shape; on the CPU the composition always runs. See kernels/README.md."""

from __future__ import annotations

from .bench import bench_kernels, format_table, main
from .dispatch import KernelDispatch, get_dispatch, microbenchmark
from .launch import DecodePlan, decode_kernel, plan_decode, rope_kernel
from .mode import MODES, resolve_mode, unavailable_reason
from .ops import decode_attention_prerope, fused_rope
from .reference import RopeParams, decode_attention_composition, rope_composition

__all__ = [
    "MODES", "DecodePlan", "KernelDispatch", "RopeParams", "bench_kernels",
    "decode_attention_composition", "decode_attention_prerope", "decode_kernel", "format_table",
    "fused_rope", "get_dispatch", "main", "microbenchmark", "plan_decode", "resolve_mode",
    "rope_composition", "rope_kernel", "unavailable_reason",
]
