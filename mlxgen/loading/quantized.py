"""Turning quantized layers back into float ones, where the policy or the backend asks for it."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten


def dequantize_model(model: nn.Module, dtype: mx.Dtype,
                     which: Callable[[nn.Module], bool] = lambda module: True) -> int:
    """Replace the quantized layers that `which` selects with their float equivalents, in place;
    returns how many were replaced."""
    replacements = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and which(module):
            w = _dequant(module, dtype)
            if isinstance(module, nn.QuantizedLinear):
                layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
                if "bias" in module:
                    layer.bias = module.bias.astype(dtype)
            else:
                layer = nn.Embedding(*w.shape)
            layer.weight = w
        elif hasattr(module, "dequantized_module") and which(module):  # our quantized expert stacks
            layer = module.dequantized_module(dtype)
        else:
            continue
        replacements.append((path, layer))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    return len(replacements)


def _dequant(module: nn.Module, dtype: mx.Dtype) -> mx.array:
    return mx.dequantize(
        module.weight, module.scales, module.get("biases"), module.group_size, module.bits
    ).astype(dtype)
