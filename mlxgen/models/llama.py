"""The shared decoder for the Llama family: Llama 2/3.x, Mistral, SmolLM2, Qwen2/2.5, Qwen3, Phi-3.

Differences are config flags (q/k/v bias, q/k norm, RoPE scaling, tied embeddings); Qwen3-MoE
reuses everything here and swaps the feed-forward of its sparse layers (qwen3_moe.py)."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache, make_cache
from ..runtime import Runtime
from .attention import Attention
from .base import ModelArgs


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


class MLP(nn.Module):
    activation = staticmethod(swiglu)  # a backend may install a fused one at load

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.activation(self.gate_proj(x), self.up_proj(x)))


def dense_mlp(args: ModelArgs, idx: int) -> nn.Module:
    return MLP(args.hidden_size, args.intermediate_size, args.mlp_bias)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, mlp: nn.Module, window: int | None = None):
        super().__init__()
        self.self_attn = Attention(args, window)
        self.mlp = mlp
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

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
        windows = args.layer_windows()
        self.layers = [
            TransformerBlock(args, mlp_factory(args, i), windows[i])
            for i in range(args.num_hidden_layers)
        ]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def embed(self, inputs: mx.array) -> mx.array:
        """Token ids -> the first layer's input (reuse/recompute starts here too)."""
        return self.embed_tokens(inputs)

    def __call__(
        self, inputs: mx.array, cache: list | None = None, last_only: bool = False
    ) -> mx.array:
        h = self.embed(inputs)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache is not None else None, last_only and i == last)
        return h


class Model(nn.Module):
    """A causal LM: token ids (B, L) -> logits (B, L, vocab)."""

    mlp_factory: Callable[[ModelArgs, int], nn.Module] = staticmethod(dense_mlp)
    stack: type[nn.Module] = DecoderStack  # the embedding, the layers and the final norm
    runtime = Runtime()  # how it runs here: set once at load by mlxgen/backends

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = self.stack(args, self.mlp_factory)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self, inputs: mx.array, cache: list | None = None, last_only: bool = False
    ) -> mx.array:
        """Logits for every position, or only the last one (prefill needs nothing else): then the
        last layer's queries, o_proj and MLP run for that one row (as llama.cpp does)."""
        return self.logits(self.model(inputs, cache, last_only))

    def logits(self, hidden: mx.array) -> mx.array:
        h = self.model.norm(hidden)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.layers

    @property
    def kv_dtype(self) -> mx.Dtype:
        """The dtype its caches hold keys and values in: the runtime's choice (a float16 cache on
        the CPU), else the dtype it computes in (a quantized embedding's: its scales')."""
        if self.runtime.kv_dtype:
            return getattr(mx, self.runtime.kv_dtype)
        embed = self.model.embed_tokens
        return embed.scales.dtype if "scales" in embed else embed.weight.dtype

    def make_cache(self, mode: str | None = None, keep_all: bool = False) -> list[KVCache]:
        """A fresh cache; mode "standard" or "pre-rope" (default: MLXGEN_CACHE_MODE, else the
        mode chosen for this device at load). Sliding-window layers get windowed caches, which
        hold only what the layer can still see unless keep_all."""
        windows = [layer.self_attn.window for layer in self.layers]
        return make_cache(len(self.layers), mode, self.runtime.cache_mode, windows, keep_all,
                          self.runtime.kv_dtype)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop tensors the model derives itself (tied head, RoPE tables); split Phi-3's fused
        qkv_proj and gate_up_proj (rows: q, k, v; gate, up) into the separate projections."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        a = self.args
        q_rows, kv_rows = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        for key in [k for k in weights if ".qkv_proj." in k or ".gate_up_proj." in k]:
            w = weights.pop(key)
            if ".qkv_proj." in key:
                parts = zip(("q_proj", "k_proj", "v_proj"), (0, q_rows, q_rows + kv_rows))
                old, ends = "qkv_proj", (q_rows, q_rows + kv_rows, q_rows + 2 * kv_rows)
            else:
                parts = zip(("gate_proj", "up_proj"), (0, w.shape[0] // 2))
                old, ends = "gate_up_proj", (w.shape[0] // 2, w.shape[0])
            for (name, begin), end in zip(parts, ends):
                weights[key.replace(old, name)] = w[begin:end]
        if self.args.tie_word_embeddings:
            for suffix in ("weight", "scales", "biases"):
                weights.pop(f"lm_head.{suffix}", None)
        return weights
