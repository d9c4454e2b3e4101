"""Backend facts and policies: which device runs, which BLAS the CPU uses, which dtype to load.

Every CPU-only decision lives behind `is_cpu()` so none of it leaks into the Metal path."""

from __future__ import annotations

import logging
import sys

import _mlxgen_blas

# If the start-up hook was not installed (e.g. running from a source tree), try now: it still
# works when mlx.core has not been imported yet.
if "mlx.core" not in sys.modules:
    _mlxgen_blas.load_blas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from . import settings  # noqa: E402

log = logging.getLogger("mlxgen")


def is_cpu() -> bool:
    return mx.default_device() == mx.cpu or not (mx.metal.is_available() or _cuda_available())


def _cuda_available() -> bool:
    cuda = getattr(mx, "cuda", None)
    return bool(cuda and cuda.is_available())


def fast_cpu_ops() -> bool:
    """Use mlxgen/cpu_ops.py's attention and SwiGLU: on the CPU, unless MLXGEN_CPU_FAST_OPS=off."""
    return is_cpu() and settings.cpu_fast_ops()


def backend_name() -> str:
    if not is_cpu():
        return "metal" if mx.metal.is_available() else "cuda"
    return "cpu"


def blas_in_use() -> str:
    """The BLAS MLX's CPU matmuls bind to, from what this process has mapped."""
    status = _mlxgen_blas.status
    if status["loaded"] and status["before_mlx"]:
        core = f", {status['core']} kernels" if status.get("core") else ""
        return f"OpenBLAS ({status['loaded']}{core})"
    if status["loaded"]:
        return "reference BLAS (OpenBLAS was loaded after mlx.core; it has no effect)"
    return f"reference BLAS (OpenBLAS {status['reason']})"


_reported = False


def report_blas() -> None:
    """One log line per process naming the BLAS; a warning when the CPU is stuck on the slow one."""
    global _reported
    if _reported or not is_cpu() or not sys.platform.startswith("linux"):
        return
    _reported = True
    blas = blas_in_use()
    if blas.startswith("OpenBLAS"):
        log.info("mlxgen: CPU backend, BLAS = %s", blas)
    else:
        log.warning(
            "mlxgen: CPU backend, BLAS = %s; float32 matmul runs ~30x slower. Install "
            "libopenblas0-pthread (apt) and reinstall mlxgen, or import mlxgen before mlx.", blas
        )


# MLX's CPU allocator keeps only 32 MiB of freed buffers by default: less than one decoder
# layer's intermediates (a 512-token chunk's SwiGLU alone is 2 x 10 MB on Qwen2.5-0.5B), so
# buffers went back to malloc and were page-faulted in again; one layer ran 17% slower.
CPU_CACHE_LIMIT = 1 << 30


def raise_cpu_cache_limit() -> None:
    """Let MLX's CPU allocator reuse up to CPU_CACHE_LIMIT bytes of freed buffers (never lowers
    a larger limit someone set)."""
    if not is_cpu():
        return
    previous = mx.set_cache_limit(CPU_CACHE_LIMIT)
    if previous > CPU_CACHE_LIMIT:
        mx.set_cache_limit(previous)


def weight_dtype(name: str | None = None) -> mx.Dtype:
    """float32 on the CPU (its BLAS has no fast f16/bf16 path), float16 on a GPU."""
    name = settings.dtype_name(name)
    if name == "auto":
        return mx.float32 if is_cpu() else mx.float16
    return getattr(mx, name)


def keep_quantized(policy: str | None = None) -> bool:
    """MLX's CPU quantized matmul is ~20x slower than float32 + OpenBLAS: dequantize on the CPU."""
    policy = settings.quantized_policy(policy)
    if policy == "auto":
        return not is_cpu()
    return policy == "keep"


def dequantize_model(model: nn.Module, dtype: mx.Dtype) -> None:
    """Replace every quantized layer with its float equivalent, in place."""
    from .models.linear import Linear  # mlxgen's (few-row products on the CPU kernel)

    replacements = []
    for path, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            w = _dequant(module, dtype)
            layer = Linear(w.shape[1], w.shape[0], bias="bias" in module)
            layer.weight = w
            if "bias" in module:
                layer.bias = module.bias.astype(dtype)
        elif isinstance(module, nn.QuantizedEmbedding):
            w = _dequant(module, dtype)
            layer = nn.Embedding(*w.shape)
            layer.weight = w
        elif hasattr(module, "dequantized_module"):  # our quantized expert stacks
            layer = module.dequantized_module(dtype)
        else:
            continue
        replacements.append((path, layer))
    if replacements:
        model.update_modules(_tree(replacements))


def _dequant(module: nn.Module, dtype: mx.Dtype) -> mx.array:
    return mx.dequantize(
        module.weight, module.scales, module.get("biases"), module.group_size, module.bits
    ).astype(dtype)


def _tree(items: list[tuple[str, nn.Module]]) -> dict:
    # Turn dotted paths ("model.layers.0.mlp") into the nested dict/list form update_modules wants.
    from mlx.utils import tree_unflatten

    return tree_unflatten(items)
