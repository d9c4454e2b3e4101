"""What runs on the CPU (Linux users, CI): OpenBLAS for the matmuls (loaded by the start-up hook,
blas.py), mlxgen's fast-math attention and SwiGLU (ops.py), and its C++ kernels (ext.py, built
once per machine) behind the layers in layers.py, quantized weights included (quant.py has the
checked forms). `install(model)` puts them in at load, for float32 models; anything else (a
float16 "Mac profile" run here) keeps MLX's own ops."""

from __future__ import annotations

import sys
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ... import settings
from ...models.attention import Attention
from ...models.llama import MLP
from ...runtime import CPU_CHUNK, Runtime
from ..swap import plug, swap
from . import blas, decode, ext, ops
from .layers import SWAPS, narrow_scales, widen_scales

# MLX's CPU allocator keeps only 32 MiB of freed buffers by default: less than one decoder
# layer's intermediates at a prefill chunk, so buffers went back to malloc and were page-faulted
# in again. Every cached byte stays in the process's memory, though: the limit is sized to the
# model (cache_limit_for), this is its floor.
CPU_CACHE_LIMIT = 48 << 20


def cache_limit_for(model) -> int:
    """Bytes of freed buffers for MLX to keep: twice one decoder layer's float32 intermediates
    at a CPU prefill chunk plus its largest dequantized projection (the scratch of a packed
    weight), at least CPU_CACHE_LIMIT."""
    a = model.args
    inter = max(a.intermediate_size, a.moe_intermediate_size, a.hidden_size)
    activations = CPU_CHUNK * (6 * a.hidden_size + 3 * inter) * 4
    scratch = max((layer.weight.shape[0] * layer.weight.shape[1] * 32 // layer.bits * 4
                   for _, layer in model.named_modules()
                   if isinstance(layer, nn.QuantizedLinear) and layer.weight.shape[0] != a.vocab_size),
                  default=0)
    return max(CPU_CACHE_LIMIT, 2 * (activations + scratch))


def raise_cache_limit(limit: int = CPU_CACHE_LIMIT) -> None:
    """Let MLX's CPU allocator reuse up to `limit` bytes of freed buffers (never lowers a larger
    limit someone set)."""
    previous = mx.set_cache_limit(limit)
    if previous > limit:
        mx.set_cache_limit(previous)


def quantized_kernels() -> bool:
    """Whether quantized weights can stay packed on this CPU at full speed: mlxgen's kernels
    (qmatvec for decode, dequantize + BLAS for prefill) are built and the fast path is on."""
    return settings.cpu_fast_ops() and ext.kernels() is not None


def uninstall(model) -> None:
    """Undo what install changed beyond the swaps (backends.prepare resets those)."""
    widen_scales(model)
    decode.forget_plans(model)


def _activation_owners() -> list[type]:
    # Layers with a SwiGLU `activation`. MoE experts exist only once their family's module was
    # imported (models/ imports a family when it builds one): the CPU backend does not import it.
    owners = [MLP]
    if (moe := sys.modules.get("mlxgen.models.qwen3_moe")) is not None:
        owners.append(moe.Experts)
    return owners


def install(model) -> Runtime:
    """mlxgen's CPU ops in `model` (MLXGEN_CPU_FAST_OPS / MLXGEN_CPU_KERNELS, read now)."""
    raise_cache_limit(cache_limit_for(model))
    blas.report_blas()
    if not settings.cpu_fast_ops() or model.model.norm.weight.dtype != mx.float32:
        return Runtime(backend="mlx", prefill_chunk_size=CPU_CHUNK)
    module = ext.kernels()  # None when off or it cannot be built (logged once)
    if module is not None:
        swap(model, SWAPS | decode.SWAPS)
        if narrow_scales(model):
            mx.clear_cache()  # the float32 scales just freed would stay in MLX's buffer cache
    plug(model, Attention, "sdpa", partial(ops.scaled_dot_product_attention, ext=module))
    for owner in _activation_owners():
        plug(model, owner, "activation", partial(ops.silu_mul, ext=module))
    return Runtime(backend="cpu", prefill_chunk_size=CPU_CHUNK, kv_dtype=kv_dtype(module is not None))


def kv_dtype(kernels: bool) -> str | None:
    """The KV cache's dtype (MLXGEN_KV_DTYPE): by default float16 where the kernels read it (a
    long context's decode step reads every cached key and value: half the bytes, as Ollama's
    cache); MLX's attention ops would convert it on every read, so float32 without them."""
    name = settings.kv_dtype()
    if name == "auto":
        return "float16" if kernels else None
    return name
