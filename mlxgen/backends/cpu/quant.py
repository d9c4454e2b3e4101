"""Products with MLX-affine quantized weights on the CPU (kernels/cpu/quant.cpp), checked: the
public form of what layers.py's quantized layers call directly (their shapes are checked at load).

The weight layout is what `mx.quantize` produces (mode "affine"): `w` (N, K * bits / 32) uint32,
`scales` and `biases` (N, K / group_size) float32, float16 or bfloat16. Decode steps use
`qmatvec` (a few rows of x against the packed codes, on all cores); a prefill chunk uses
`dequantize` into float32 and a BLAS matmul. Both check their arguments (ConfigError) before
anything is allocated, and fall back to `mx.quantized_matmul` / `mx.dequantize` where mlxgen's
CPU kernels are not built (or MLXGEN_CPU_KERNELS=off).
"""

from __future__ import annotations

import os

import mlx.core as mx

from ...errors import ConfigError
from .ext import kernels

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def _threads() -> int:
    return min(8, os.cpu_count() or 1)  # memory-bound: a few cores suffice


def check_quantized(w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> int:
    """Raise ConfigError unless (w, scales, biases) is a consistent affine-quantized matrix;
    return K, the length of its unpacked rows."""
    if bits not in BITS:
        raise ConfigError(f"quantized weights: bits must be one of {BITS}, got {bits!r}.")
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"quantized weights: group_size must be one of {GROUP_SIZES}, got {group_size!r}.")
    if w.dtype != mx.uint32 or w.ndim != 2:
        raise ConfigError(f"quantized weights: w must be a 2-D uint32 array as mx.quantize returns, "
                          f"got {w.dtype} of shape {tuple(w.shape)}.")
    if scales.dtype != biases.dtype or scales.dtype not in SCALE_DTYPES:
        raise ConfigError(f"quantized weights: scales and biases must share one dtype of float32, float16 "
                          f"or bfloat16, got {scales.dtype} and {biases.dtype}.")
    n, words = w.shape
    k, rest = divmod(words * 32, bits)
    if rest or k % group_size or n < 1 or k < 1:
        raise ConfigError(f"quantized weights: w of shape {tuple(w.shape)} does not hold whole groups of "
                          f"{group_size} {bits}-bit values per row; check bits and group_size.")
    want = (n, k // group_size)
    if tuple(scales.shape) != want or tuple(biases.shape) != want:
        raise ConfigError(f"quantized weights: scales and biases must have shape {want} for w of shape "
                          f"{tuple(w.shape)} at {bits} bits, group_size {group_size}; got "
                          f"{tuple(scales.shape)} and {tuple(biases.shape)}.")
    return k


def qmatvec(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int,
            bias: mx.array | None = None) -> mx.array:
    """x @ dequantize(w).T (+ bias) in float32 for float32 x (..., K); meant for a few rows
    (decode), where it reads the packed weight once on all cores."""
    k = check_quantized(w, scales, biases, bits, group_size)
    if x.dtype != mx.float32 or x.ndim < 1 or x.shape[-1] != k:
        raise ConfigError(f"qmatvec: x must be float32 with last dimension {k} (the weight's rows), "
                          f"got {x.dtype} of shape {tuple(x.shape)}.")
    if bias is not None and (tuple(bias.shape) != (w.shape[0],) or bias.dtype not in SCALE_DTYPES):
        raise ConfigError(f"qmatvec: bias must be float32, float16 or bfloat16 of shape ({w.shape[0]},), "
                          f"got {bias.dtype} of shape {tuple(bias.shape)}.")
    ext = kernels()
    if ext is None:
        y = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)
        y = y.astype(mx.float32)
        return y if bias is None else y + bias
    return ext.qmatvec(x, w, scales, biases, bits, group_size, _threads(), bias)  # bias added in the kernel


def dequantize(w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> mx.array:
    """The float32 (N, K) matrix: code * scale + bias per element, as mx.dequantize computes it
    (bit for bit), e.g. into a prefill chunk's scratch ahead of a BLAS matmul."""
    check_quantized(w, scales, biases, bits, group_size)
    ext = kernels()
    if ext is None:
        f32 = mx.float32
        return mx.dequantize(w, scales.astype(f32), biases.astype(f32), group_size=group_size, bits=bits)
    return ext.dequantize(w, scales, biases, bits, group_size, _threads())
