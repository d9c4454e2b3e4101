"""What runs here: the device MLX computes on, and the weight policies that follow from it.

Facts only: nothing here changes a model. mlxgen/backends/__init__.py acts on them once, at load."""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from .. import settings


def metal_available() -> bool:
    return mx.metal.is_available()


def cuda_available() -> bool:
    cuda = getattr(mx, "cuda", None)
    return bool(cuda and cuda.is_available())


def is_cpu() -> bool:
    """True when MLX computes on the CPU: no GPU backend, or the CPU chosen as default device."""
    return mx.default_device() == mx.cpu or not (metal_available() or cuda_available())


def backend_name() -> str:
    """"cpu", "metal" or "cuda": the device MLX computes on by default."""
    if is_cpu():
        return "cpu"
    return "metal" if metal_available() else "cuda"


def device_name() -> str:
    """The GPU's name (e.g. "Apple M3 Max"), or "cpu"."""
    if is_cpu():
        return "cpu"
    return str(mx.device_info().get("device_name", backend_name()))


def weight_dtype(name: str | None = None) -> mx.Dtype:
    """float32 on the CPU (its BLAS has no fast f16/bf16 path), float16 on a GPU."""
    name = settings.dtype_name(name)
    if name == "auto":
        return mx.float32 if is_cpu() else mx.float16
    return getattr(mx, name)


@cache
def supported_bits(bits: int, group_size: int) -> bool:
    """Whether this backend multiplies `bits`-bit affine weights natively. MLX's CUDA backend
    gained bit widths release by release, so it is asked with a tiny product, once."""
    if backend_name() != "cuda":
        return True
    try:
        w, scales, biases = mx.quantize(mx.ones((32, group_size)), group_size, bits)
        mx.eval(mx.quantized_matmul(mx.ones((1, group_size)), w, scales, biases, True, group_size, bits))
        return True
    except (RuntimeError, ValueError):
        return False
