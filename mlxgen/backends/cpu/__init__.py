"""What runs on the CPU (Linux users, CI): OpenBLAS for the matmuls (loaded by the start-up hook,
blas.py), mlxgen's fast-math attention and SwiGLU (ops.py), and its C++ kernels (ext.py, built
once per machine) behind the layers in layers.py, quantized weights included (quant.py has the
checked forms). `install(model)` puts them in at load, for float32 models; anything else (a
float16 "Mac profile" run here) keeps MLX's own ops."""

from __future__ import annotations

from functools import partial

import mlx.core as mx

from ... import settings
from ...models.attention import Attention
from ...models.llama import MLP
from ...models.qwen3_moe import Experts
from ...runtime import CPU_CHUNK, Runtime
from ..swap import plug, swap
from . import blas, ext, ops
from .layers import SWAPS

# MLX's CPU allocator keeps only 32 MiB of freed buffers by default: less than one decoder
# layer's intermediates, so buffers went back to malloc and were page-faulted in again.
CPU_CACHE_LIMIT = 1 << 30


def raise_cache_limit() -> None:
    """Let MLX's CPU allocator reuse up to CPU_CACHE_LIMIT bytes of freed buffers (never lowers
    a larger limit someone set)."""
    previous = mx.set_cache_limit(CPU_CACHE_LIMIT)
    if previous > CPU_CACHE_LIMIT:
        mx.set_cache_limit(previous)


def quantized_kernels() -> bool:
    """Whether quantized weights can stay packed on this CPU at full speed: mlxgen's kernels
    (qmatvec for decode, dequantize + BLAS for prefill) are built and the fast path is on."""
    return settings.cpu_fast_ops() and ext.kernels() is not None


def install(model) -> Runtime:
    """mlxgen's CPU ops in `model` (MLXGEN_CPU_FAST_OPS / MLXGEN_CPU_KERNELS, read now)."""
    raise_cache_limit()
    blas.report_blas()
    if not settings.cpu_fast_ops() or model.model.norm.weight.dtype != mx.float32:
        return Runtime(backend="mlx", prefill_chunk_size=CPU_CHUNK)
    module = ext.kernels()  # None when off or it cannot be built (logged once)
    if module is not None:
        swap(model, SWAPS)
    plug(model, Attention, "sdpa", partial(ops.scaled_dot_product_attention, ext=module))
    for owner in (MLP, Experts):
        plug(model, owner, "activation", partial(ops.silu_mul, ext=module))
    return Runtime(backend="cpu", prefill_chunk_size=CPU_CHUNK)
