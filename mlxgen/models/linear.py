"""Linear for every model: MLX's, except on the CPU where a product with a few rows (a decode
step, the last prompt row) takes mlxgen's streaming matvec kernel: MLX sends it through a packing
sgemm (decode 1.4x faster on Qwen2.5-0.5B, 1.6x on SmolLM2: bench/NOTES.md)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import cpu_ops


class Linear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        if (y := cpu_ops.few_rows_linear(x, self)) is not None:
            return y
        return super().__call__(x)
