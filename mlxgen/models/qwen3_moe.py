"""Qwen3-MoE: the shared decoder with a routed mixture-of-experts feed-forward on sparse layers."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .base import ModelArgs
from .llama import Model as LlamaModel
from .llama import dense_mlp, swiglu


class ExpertLinear(nn.Module):
    """`num_experts` stacked linear maps; each token is multiplied by its chosen experts only."""

    def __init__(self, num_experts: int, in_dims: int, out_dims: int):
        super().__init__()
        scale = in_dims**-0.5
        self.weight = mx.random.uniform(-scale, scale, (num_experts, out_dims, in_dims))

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        return QuantizedExpertLinear.from_float(self, group_size, bits)


class QuantizedExpertLinear(nn.Module):
    def __init__(self, num_experts: int, in_dims: int, out_dims: int, group_size: int, bits: int):
        super().__init__()
        self.group_size, self.bits = group_size, bits
        w = mx.zeros((num_experts, out_dims, in_dims))
        self.weight, self.scales, self.biases = mx.quantize(w, group_size, bits)

    @classmethod
    def from_float(cls, layer: ExpertLinear, group_size: int, bits: int) -> "QuantizedExpertLinear":
        e, out_dims, in_dims = layer.weight.shape
        q = cls(e, in_dims, out_dims, group_size, bits)
        q.weight, q.scales, q.biases = mx.quantize(layer.weight, group_size, bits)
        return q

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        return mx.gather_qmm(
            x, self.weight, self.scales, self.biases, rhs_indices=indices,
            transpose=True, group_size=self.group_size, bits=self.bits,
        )

    def dequantized_module(self, dtype: mx.Dtype) -> ExpertLinear:
        e, out_dims, _ = self.weight.shape
        layer = ExpertLinear(e, self.scales.shape[-1] * self.group_size, out_dims)
        w = mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits)
        layer.weight = w.astype(dtype)
        return layer


class Experts(nn.Module):
    activation = staticmethod(swiglu)  # a backend may install a fused one at load

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = ExpertLinear(num_experts, dim, hidden)
        self.up_proj = ExpertLinear(num_experts, dim, hidden)
        self.down_proj = ExpertLinear(num_experts, hidden, dim)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        # x: (..., D) -> (..., 1, 1, D) so each of the k chosen experts sees a 1-row matrix.
        x = mx.expand_dims(x, (-2, -3))
        h = self.activation(self.gate_proj(x, indices), self.up_proj(x, indices))
        return self.down_proj(h, indices).squeeze(-2)  # (..., k, D)


class SparseMoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.experts = Experts(args.num_experts, args.hidden_size, args.moe_intermediate_size)

    def __call__(self, x: mx.array) -> mx.array:
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        k = self.top_k
        indices = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])
        weights = mx.take_along_axis(probs, indices, axis=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        y = self.experts(x, indices)
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


def moe_or_dense(args: ModelArgs, idx: int) -> nn.Module:
    return SparseMoE(args) if args.is_moe_layer(idx) else dense_mlp(args, idx)


class Model(LlamaModel):
    mlp_factory = staticmethod(moe_or_dense)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Stack per-expert tensors (HF layout) into (num_experts, out, in)."""
        weights = super().sanitize(weights)
        weights = {k.replace(".mlp.switch_mlp.", ".mlp.experts."): v for k, v in weights.items()}
        n = self.args.num_experts
        for i in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{i}.mlp.experts"
            for name in ("gate_proj", "up_proj", "down_proj"):
                for suffix in ("weight", "scales", "biases"):
                    parts = [f"{prefix}.{e}.{name}.{suffix}" for e in range(n)]
                    if parts[0] in weights:
                        weights[f"{prefix}.{name}.{suffix}"] = mx.stack([weights.pop(p) for p in parts])
            _split_fused_experts(weights, prefix)
        return weights


def _split_fused_experts(weights: dict[str, mx.array], prefix: str) -> None:
    # transformers>=5 may save experts fused: gate_up_proj (E, 2I, D) and down_proj (E, D, I).
    fused = weights.pop(f"{prefix}.gate_up_proj", None)
    if fused is not None:
        gate, up = mx.split(fused, 2, axis=1)
        weights[f"{prefix}.gate_proj.weight"] = gate
        weights[f"{prefix}.up_proj.weight"] = up
    down = weights.pop(f"{prefix}.down_proj", None)
    if down is not None:
        weights[f"{prefix}.down_proj.weight"] = down
