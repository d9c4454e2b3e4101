"""The float dtype a checkpoint stores its matrices in.

mlx-lm computes in the checkpoint's own dtype on a GPU (bf16 stays bf16, f16 stays f16); this
reports that dtype so the backend can default to it instead of forcing float16."""

from __future__ import annotations

from collections import Counter
from typing import Mapping

import mlx.core as mx


def checkpoint_float_dtype(weights: Mapping[str, mx.array]) -> mx.Dtype | None:
    """The floating dtype of most of the checkpoint's matrix elements (ndim >= 2).

    Quantized matrices count through their scales, one per group of about 32 weights (GGUF
    repacks: float16; MLX checkpoints: the dtype they were saved in); 1-D norms and biases are
    ignored (GGUF keeps them float32). None when there is no float matrix at all."""
    total: Counter = Counter()
    for name, array in weights.items():
        if array.ndim < 2 or not mx.issubdtype(array.dtype, mx.floating):
            continue
        if name.endswith(".biases"):  # counted once, through .scales
            continue
        total[array.dtype] += array.size * (32 if name.endswith(".scales") else 1)
    return max(total, key=total.get) if total else None
