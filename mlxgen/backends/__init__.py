"""The seam between plain-MLX models and this machine, crossed once per model, at load.

Models (mlxgen/models) are plain MLX and never ask where they run. `prepare(model)` picks this
device's implementations of attention, SwiGLU, norms, RoPE and few-row products by swapping in
a backend's layer subclasses and ops, and records the choice (mlxgen/runtime.py) on the model:

- metal/  what runs on a Mac: MLX's fused ops, our Metal kernels where measured faster, wired memory;
- cpu/    Linux CPUs: OpenBLAS, fast-math attention/SwiGLU, C++ kernels;
- "cuda" and "mlx": MLX's own ops only (no kernels of ours)."""

from __future__ import annotations

import importlib
import sys

import mlx.core as mx

from .. import settings
from ..runtime import GPU_CHUNK, Runtime
from . import device
from .swap import reset

BACKENDS = ("cpu", "metal", "cuda", "mlx")


def __getattr__(name: str):
    # cpu/ and metal/ are imported when first used: a CPU machine never imports the Metal
    # backend's modules, a Mac never builds or imports the CPU kernels (`import mlxgen` is
    # part of every fresh process's wait).
    if name in ("cpu", "metal"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_environment() -> None:
    """Every MLXGEN_* variable parsed, and what they demand of this device checked: load and
    generate call this first."""
    settings.validate_all()
    if settings.kernels_mode() == "on":  # the README promises an error where Metal kernels cannot run
        from .metal.mode import require_available

        require_available("MLXGEN_KERNELS=on")


def keep_quantized(policy: str | None = None) -> bool:
    """Whether quantized weights stay packed (argument, else MLXGEN_QUANTIZED; "auto": yes, except
    on a CPU without mlxgen's quantized kernels, where MLX's own quantized matmuls would make
    prefill many times slower than float32 BLAS)."""
    policy = settings.quantized_policy(policy)
    if policy != "auto":
        return policy == "keep"
    if not device.is_cpu():
        return True
    from . import cpu

    return cpu.quantized_kernels()


def dequantize_here(module, policy: str | None = None) -> bool:
    """Kept-quantized layers this device cannot multiply: bit widths a CUDA build lacks; and, for
    policy "auto", the MoE expert stacks on the CPU (MLX's gather_qmm there is far slower than
    float32, and mlxgen has no CPU kernel for them). An explicit "keep" keeps them."""
    if hasattr(module, "dequantized_module"):
        return device.is_cpu() and settings.quantized_policy(policy) == "auto"
    return not device.supported_bits(module.bits, module.group_size)


def projection_scale_dtype(float_dtype):
    """The dtype in which a loader should hand over quantized projections' scales and biases for
    a model computing in float_dtype: float16 where the CPU backend would narrow them to it
    anyway (cpu.layers.narrow_scales; GGUF's scales are float16 values), else float_dtype."""
    if float_dtype == mx.float32 and device.is_cpu():
        from . import cpu

        if cpu.quantized_kernels():
            return mx.float16
    return float_dtype


def gguf_repack():
    """The CPU kernels for a GGUF load's block repack (their repack_blocks, kernels/cpu/repack.cpp:
    the numpy repack's bytes, on every core; and empty, an unfilled MLX array for it), where they
    are built and allowed: a CPU machine, MLXGEN_CPU_KERNELS not off. Else None, and the loader
    repacks in numpy. Never starts a build (ext.built)."""
    if not device.is_cpu():
        return None
    from .cpu import ext

    module = ext.built()
    return module if hasattr(module, "repack_blocks") else None


def prepare(model, backend: str | None = None) -> Runtime:
    """Install `backend`'s implementations in `model` (default: this device's); returns and
    records how the model runs. Calling it again re-decides from scratch."""
    backend = backend or device.backend_name()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}.")
    if (cpu := sys.modules.get(f"{__name__}.cpu")) is not None:  # only it can have installed
        cpu.uninstall(model)  # float16 scales back to the float32 they were loaded as
    reset(model)
    if backend == "cpu":
        from . import cpu

        runtime = cpu.install(model)
    elif backend == "metal":
        from . import metal

        runtime = metal.install(model)
    else:
        runtime = Runtime(backend="mlx", prefill_chunk_size=GPU_CHUNK)
    model.runtime = runtime
    return runtime


__all__ = ["BACKENDS", "Runtime", "check_environment", "cpu", "dequantize_here", "device",
           "gguf_repack", "keep_quantized", "metal", "prepare", "projection_scale_dtype"]
