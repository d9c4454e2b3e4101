"""CPU versions of the model's layers, each backed by one of mlxgen's C++ kernels (ext.py).

They subclass the plain MLX layers and change only how the forward pass computes; the CPU
backend (this package's __init__) swaps them in at load where the kernels are built, and they
fall back to MLX's op for inputs a kernel does not take (float16, many rows, array offsets).
Quantized layers keep their weights packed: a few rows read them through the quantized matvec
(decode is memory-bound: ~4.5 bits a weight instead of 32), a prefill chunk dequantizes each
projection into a float32 buffer (which MLX's allocator reuses) for a BLAS matmul."""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from ...models.rope import RoPE
from . import ext

MATVEC_ROWS = 8  # float products with at most this many rows take the streaming matvec kernel
# Quantized products with at most this many rows read the packed weight once (qmatvec) instead of
# dequantizing it for BLAS: a session turn or a question (~30 tokens) then costs no full
# dequantization of every matrix (crossover measured in bench/NOTES.md, "Session 8").
QMATVEC_ROWS = 32
# Memory-bound: a few cores saturate the bandwidth.
MATVEC_THREADS = min(8, os.cpu_count() or 1)


def _matvec(x: mx.array, weight: mx.array) -> mx.array | None:
    # MLX sends a few-row product through a packing sgemm; the kernel streams the weight once.
    if weight.dtype != mx.float32 or x.dtype != mx.float32 or x.size // x.shape[-1] > MATVEC_ROWS:
        return None
    return ext.loaded().matvec(x, weight, MATVEC_THREADS)


class CpuLinear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        y = _matvec(x, self.weight)
        if y is None:
            return super().__call__(x)
        return y + self.bias if "bias" in self else y


class CpuEmbedding(nn.Embedding):
    """A tied LM head's few-row product on the matvec kernel; lookups as MLX's."""

    def as_linear(self, x: mx.array) -> mx.array:
        y = _matvec(x, self.weight)
        return super().as_linear(x) if y is None else y


QUANT_BITS, QUANT_GROUPS = (2, 3, 4, 5, 6, 8), (32, 64, 128)  # what kernels/cpu/quant.cpp takes


def _quantized_product(x: mx.array, layer: nn.Module, bias: mx.array | None = None) -> mx.array | None:
    # The weight's shapes were checked at load; only what varies per call is checked here.
    if x.dtype != mx.float32 or getattr(layer, "mode", "affine") != "affine":
        return None
    if layer.bits not in QUANT_BITS or layer.group_size not in QUANT_GROUPS:
        return None
    kernels = ext.loaded()
    args = (layer.weight, layer.scales, layer.biases, layer.bits, layer.group_size, MATVEC_THREADS)
    if x.size // x.shape[-1] <= QMATVEC_ROWS:
        # The bias is added in the kernel: a decode step's graph has no Broadcast + Add per projection.
        return kernels.qmatvec(x, *args, bias)
    y = x @ kernels.dequantize(*args).T
    return y if bias is None else y + bias


class CpuQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        y = _quantized_product(x, self, self.get("bias"))
        return super().__call__(x) if y is None else y


class CpuQuantizedEmbedding(nn.QuantizedEmbedding):
    """A tied quantized LM head (a few rows: the prompt's last, a decode step) on qmatvec; the
    lookup's rows through the dequantize kernel (MLX's dequantize is ~30 graph nodes here)."""

    def __call__(self, x: mx.array) -> mx.array:
        if getattr(self, "mode", "affine") != "affine" or self.bits not in QUANT_BITS or \
                self.group_size not in QUANT_GROUPS or self.scales.dtype != mx.float32:
            return super().__call__(x)
        ids = x.reshape(-1)
        rows = ext.loaded().dequantize(self["weight"][ids], self["scales"][ids], self["biases"][ids],
                                       self.bits, self.group_size, 1)
        return rows.reshape(*x.shape, -1)

    def as_linear(self, x: mx.array) -> mx.array:
        y = _quantized_product(x, self)
        return super().as_linear(x) if y is None else y


def narrow_scales(model: nn.Module) -> int:
    """Store quantized projections' float32 scales and biases as float16 where float16 holds
    every value exactly (GGUF's scales were float16 in the file): the same weights, 0.5 bit less
    per weight to keep resident and to read per decode step. Returns how many. Embeddings keep
    theirs: their lookup computes in the scales' dtype, and mlxgen/reuse reads the model's
    dtype from them."""
    candidates = []
    for _, layer in model.named_modules():
        if isinstance(layer, nn.QuantizedLinear) and layer.scales.dtype == mx.float16:
            layer.narrowed_scales = True  # loaded narrow (backends.projection_scale_dtype)
        if isinstance(layer, nn.QuantizedLinear) and layer.scales.dtype == mx.float32:
            s16, b16 = layer.scales.astype(mx.float16), layer.biases.astype(mx.float16)
            exact = mx.array_equal(s16.astype(mx.float32), layer.scales) & \
                mx.array_equal(b16.astype(mx.float32), layer.biases)
            candidates.append((layer, s16, b16, exact))
    mx.eval([c[1:] for c in candidates])  # one evaluation for all layers
    narrowed = 0
    for layer, s16, b16, exact in candidates:
        if exact.item():
            layer.scales, layer.biases = s16, b16
            layer.narrowed_scales = True
            narrowed += 1
    return narrowed


def widen_scales(model: nn.Module) -> None:
    """Undo narrow_scales (exactly: float16 -> float32 is lossless), for another backend, whose
    ops would compute in the scales' float16."""
    for _, layer in model.named_modules():
        if getattr(layer, "narrowed_scales", False):
            layer.scales, layer.biases = layer.scales.astype(mx.float32), layer.biases.astype(mx.float32)
            layer.narrowed_scales = False


class CpuRMSNorm(nn.RMSNorm):
    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype == self.weight.dtype == mx.float32:
            return ext.loaded().rms_norm(x, self.weight, self.eps)
        return super().__call__(x)


class CpuRoPE(RoPE):
    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if x.dtype in (mx.float16, mx.bfloat16):  # stored half K/V being placed (reuse): MLX's
            return self(x.astype(mx.float32), offset).astype(x.dtype)  # CPU op is slower in halves
        if isinstance(offset, int) and x.ndim == 4 and x.dtype == mx.float32 and self.dims == x.shape[-1]:
            # One pass, reading the transposed projection in place (partial rotary: MLX's op).
            out = ext.loaded().rope(x, self.dims, self.traditional, self.inverse_frequencies(),
                                    self.scale, offset)
            return out if self.mscale == 1.0 else out * self.mscale
        return super().__call__(x, offset)


SWAPS = {nn.Linear: CpuLinear, nn.Embedding: CpuEmbedding, nn.RMSNorm: CpuRMSNorm, RoPE: CpuRoPE,
         nn.QuantizedLinear: CpuQuantizedLinear, nn.QuantizedEmbedding: CpuQuantizedEmbedding}
