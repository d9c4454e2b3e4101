"""The shared decoder for the Llama family: Llama 2/3.x, Mistral, SmolLM2, Qwen2/2.5, Qwen3.

Differences are config flags (q/k/v bias, q/k norm, RoPE scaling, tied embeddings); Qwen3-MoE
reuses everything here and swaps the feed-forward of its sparse layers (qwen3_moe.py)."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from .. import backend, cpu_ops
from ..cache import KVCache, make_cache
from .attention import Attention
from .base import ModelArgs
from .linear import Linear
from .norm import RMSNorm


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    if backend.fast_cpu_ops():  # MLX's CPU sigmoid is slow: see mlxgen/cpu_ops.py
        return cpu_ops.silu_mul(gate, up)
    return nn.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=bias)
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def dense_mlp(args: ModelArgs, idx: int) -> nn.Module:
    return MLP(args.hidden_size, args.intermediate_size, args.mlp_bias)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, mlp: nn.Module):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache=None, last_only: bool = False) -> mx.array:
        """Hidden states for every position, or with last_only for the last one: the model's
        final layer needs nothing else (its K/V still covers every position)."""
        attn = self.self_attn(self.input_layernorm(x), cache, last_only)
        h = (x[:, -1:] if last_only else x) + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderStack(nn.Module):
    def __init__(self, args: ModelArgs, mlp_factory: Callable[[ModelArgs, int], nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            TransformerBlock(args, mlp_factory(args, i)) for i in range(args.num_hidden_layers)
        ]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self, inputs: mx.array, cache: list | None = None, last_only: bool = False
    ) -> mx.array:
        h = self.embed_tokens(inputs)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache is not None else None, last_only and i == last)
        return h


class Model(nn.Module):
    """A causal LM: token ids (B, L) -> logits (B, L, vocab)."""

    mlp_factory: Callable[[ModelArgs, int], nn.Module] = staticmethod(dense_mlp)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DecoderStack(args, self.mlp_factory)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self, inputs: mx.array, cache: list | None = None, last_only: bool = False
    ) -> mx.array:
        """Logits for every position, or only the last one (prefill needs nothing else): then the
        last layer's queries, o_proj and MLP run for that one row (as llama.cpp does)."""
        return self.logits(self.model(inputs, cache, last_only))

    def logits(self, hidden: mx.array) -> mx.array:
        h = self.model.norm(hidden)
        if not self.args.tie_word_embeddings:
            return self.lm_head(h)  # a Linear: few rows take the CPU kernel by themselves
        embed = self.model.embed_tokens
        out = cpu_ops.few_rows_linear(h, embed)
        return out if out is not None else embed.as_linear(h)

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.layers

    def make_cache(self) -> list[KVCache]:
        return make_cache(len(self.layers))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop tensors the model derives itself (tied head, RoPE tables)."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            for suffix in ("weight", "scales", "biases"):
                weights.pop(f"lm_head.{suffix}", None)
        return weights
