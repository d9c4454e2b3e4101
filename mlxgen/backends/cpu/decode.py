"""A decoder layer's decode step on the CPU in two C++ ops (kernels/cpu/decode_layer.cpp).

At one token a layer is ~20 MLX graph nodes (norms, seven quantized matvecs, bias adds, RoPE,
cache views, attention, SwiGLU, residuals), and MLX's per-node CPU cost was a large share of the
step (bench/NOTES.md). Here: `decode_qkv` (norm, q/k/v projections, q/k norms, RoPE) -> the cache's
slice update -> `decode_out` (attention over the cache buffer, output projection, residual, norm,
SwiGLU MLP, residual). Layers the ops do not cover (float weights, a mixture of experts, a sliding
window, partial rotary, pre-RoPE caches, several tokens) run as plain MLX layers."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ...cache import KVCache
from ...models.llama import MLP, TransformerBlock
from . import ext
from .layers import MATVEC_THREADS, QUANT_BITS, QUANT_GROUPS


@dataclass(frozen=True)
class _Plan:
    bits_in: list[int]  # q, k, v
    groups_in: list[int]
    bits_out: list[int]  # o, gate, up, down
    groups_out: list[int]
    bias: bool  # q/k/v biases (Qwen2)
    qk_norm: bool  # q/k RMSNorm (Qwen3)


def _quantized(layer: nn.Module) -> bool:
    return (isinstance(layer, nn.QuantizedLinear) and getattr(layer, "mode", "affine") == "affine"
            and layer.bits in QUANT_BITS and layer.group_size in QUANT_GROUPS)


def _f32(*arrays: mx.array) -> bool:
    return all(a.dtype == mx.float32 for a in arrays)


def plan(block: TransformerBlock) -> _Plan | None:
    """What the decode ops need to know about `block`, or None when they do not cover it."""
    attn, mlp = block.self_attn, block.mlp
    if type(mlp) is not MLP or attn.window is not None or attn.rope.dims != attn.head_dim:
        return None
    ins = (attn.q_proj, attn.k_proj, attn.v_proj)
    outs = (attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if not all(_quantized(p) for p in ins + outs) or any("bias" in p for p in outs):
        return None
    norms = [block.input_layernorm, block.post_attention_layernorm]
    bias = "bias" in attn.q_proj
    if bias and not ("bias" in attn.k_proj and "bias" in attn.v_proj and
                     _f32(attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias)):
        return None
    qk_norm = "q_norm" in attn
    if qk_norm:
        norms += [attn.q_norm, attn.k_norm]
    if not all(isinstance(n, nn.RMSNorm) and _f32(n.weight) for n in norms):
        return None
    eps = {n.eps for n in norms[:1] + norms[2:]}  # decode_qkv takes one eps for its norms
    if len(eps) > 1:
        return None
    return _Plan([p.bits for p in ins], [p.group_size for p in ins], [p.bits for p in outs],
                 [p.group_size for p in outs], bias, qk_norm)


def forget_plans(model: nn.Module) -> None:
    """Drop every layer's plan (made on its first call): the next install decides afresh."""
    for _, module in model.named_modules():
        module.__dict__.pop("_decode_plan", None)


class CpuTransformerBlock(TransformerBlock):
    def __call__(self, x: mx.array, cache=None, last_only: bool = False) -> mx.array:
        steps = self.__dict__.get("_decode_plan", False)
        if steps is False:  # decided once per layer, on its first call
            steps = self.__dict__["_decode_plan"] = plan(self)
        if (steps is None or x.shape[1] != 1 or x.dtype != mx.float32 or type(cache) is not KVCache
                or cache.window is not None or cache.keys is None):
            return super().__call__(x, cache, last_only)
        return self.decode_step(x, cache, steps)

    def decode_step(self, x: mx.array, cache: KVCache, steps: _Plan) -> mx.array:
        # Children and arrays by item (a Module is a dict): attribute access goes through
        # Module.__getattr__ in Python, ~40 times per layer and token.
        attn, mlp, kernels = self["self_attn"], self["mlp"], ext.loaded()
        norm1, norm2, rope = self["input_layernorm"], self["post_attention_layernorm"], attn["rope"]
        arrays = [x, norm1["weight"]]
        for name in ("q_proj", "k_proj", "v_proj"):
            p = attn[name]
            arrays += [p["weight"], p["scales"], p["biases"]]
        arrays.append(rope.inverse_frequencies())
        if steps.bias:
            arrays += [attn[name]["bias"] for name in ("q_proj", "k_proj", "v_proj")]
        if steps.qk_norm:
            arrays += [attn["q_norm"]["weight"], attn["k_norm"]["weight"]]
        q, k, v = kernels.decode_qkv(
            arrays, steps.bits_in, steps.groups_in, attn.n_heads, attn.n_kv_heads, attn.head_dim,
            norm1.eps, cache.offset, rope.scale, rope.traditional, rope.mscale, steps.bias,
            steps.qk_norm, cache.keys.dtype, MATVEC_THREADS)
        cache.append(k, v)
        o = attn["o_proj"]
        arrays = [x, q, cache.keys, cache.values, o["weight"], o["scales"], o["biases"], norm2["weight"]]
        for name in ("gate_proj", "up_proj", "down_proj"):
            p = mlp[name]
            arrays += [p["weight"], p["scales"], p["biases"]]
        return kernels.decode_out(arrays, steps.bits_out, steps.groups_out, cache.offset - cache.start,
                                  attn.scale, norm2.eps, MATVEC_THREADS)


SWAPS = {TransformerBlock: CpuTransformerBlock}
