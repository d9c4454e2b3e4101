"""Gemma 2 and Gemma 3 (text): the shared attention with Gemma's block around it.

What differs from the Llama decoder: (1 + w) RMSNorm (the 1 is added to the weights at load, so
the layers are plain nn.RMSNorm), norms after attention and around the feed-forward, embeddings
scaled by sqrt(hidden) in the weights' dtype, a GELU-tanh gated MLP, a tied head, alternating
sliding-window and global layers (Gemma 3: each kind with its own RoPE base), the attention scale
from query_pre_attn_scalar, and (Gemma 2) tanh soft-capping of attention scores and logits."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from .attention import Attention, make_rope
from .base import ModelArgs
from .llama import Model as LlamaModel


def gelu_tanh_gate(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu_approx(gate) * up


class GeluMLP(nn.Module):
    # Not llama.MLP: a backend installs its SwiGLU into every MLP, and this one is not SwiGLU.
    activation = staticmethod(gelu_tanh_gate)

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.activation(self.gate_proj(x), self.up_proj(x)))


def softcapped_attention(q, k, v, scale: float, mask, cap: float) -> mx.array:
    """Attention with scores squashed to cap * tanh(scores / cap) before the softmax (MLX ops:
    fused sdpa has no soft-capping). q: (B, H, L, D); k, v: (B, KV, N, D)."""
    B, H, L, D = q.shape
    KV, N = k.shape[1], k.shape[2]
    q = (q * scale).reshape(B, KV, H // KV, L, D)
    scores = q @ k[:, :, None].swapaxes(-1, -2)
    scores = mx.tanh(scores / cap) * cap
    if isinstance(mask, str):
        mask = mx.arange(N - L, N)[:, None] >= mx.arange(N)[None]
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights @ v[:, :, None]).reshape(B, H, L, -1)


class SoftcapAttention(Attention):
    """Gemma 2's attention: its own attend (a backend's sdpa cannot soft-cap, so none is used)."""

    def __init__(self, args: ModelArgs, window: int | None, rope):
        super().__init__(args, window, rope)
        self.cap = args.attn_logit_softcapping

    def attend(self, q: mx.array, k: mx.array, v: mx.array, cache, last_only: bool) -> mx.array:
        q, k, v, mask = self.rotate(q, k, v, cache, last_only)
        return softcapped_attention(q, k, v, self.scale, mask, self.cap)


class GemmaBlock(nn.Module):
    def __init__(self, args: ModelArgs, window: int | None):
        super().__init__()
        rope = None
        if window is not None and args.rope_local_base_freq is not None:
            rope = make_rope(args, base=args.rope_local_base_freq)  # Gemma 3's local layers
        cls = SoftcapAttention if args.attn_logit_softcapping else Attention
        self.self_attn = cls(args, window, rope)
        self.mlp = GeluMLP(args.hidden_size, args.intermediate_size)
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.input_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(dim, eps=eps)

    def __call__(self, x: mx.array, cache=None, last_only: bool = False) -> mx.array:
        attn = self.self_attn(self.input_layernorm(x), cache, last_only)
        h = (x[:, -1:] if last_only else x) + self.post_attention_layernorm(attn)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class GemmaStack(nn.Module):
    def __init__(self, args: ModelArgs, mlp_factory: Callable | None = None):
        super().__init__()
        self.hidden_size = args.hidden_size
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [GemmaBlock(args, w) for w in args.layer_windows()]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def embed(self, inputs: mx.array) -> mx.array:
        h = self.embed_tokens(inputs)
        # transformers multiplies by sqrt(hidden) rounded to the weights' dtype.
        return h * mx.array(self.hidden_size**0.5, dtype=h.dtype)

    def __call__(self, inputs: mx.array, cache: list | None = None, last_only: bool = False) -> mx.array:
        h = self.embed(inputs)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache is not None else None, last_only and i == last)
        return h


# Norm weights stored as w for (1 + w) scaling in Hugging Face checkpoints.
_NORMS = ("layernorm.weight", "norm.weight")


class Model(LlamaModel):
    stack = GemmaStack

    def logits(self, hidden: mx.array) -> mx.array:
        logits = super().logits(hidden)
        cap = self.args.final_logit_softcapping
        return logits if not cap else mx.tanh(logits / cap) * cap

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Hugging Face layout -> ours: the text decoder of a multimodal Gemma 3 checkpoint
        (vision tower dropped), and (1 + w) norms folded into plain RMSNorm weights."""
        out = {}
        for key, w in weights.items():
            if key.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                               "model.multi_modal_projector.")):
                continue
            key = key.replace("model.language_model.", "model.").replace("language_model.", "")
            if key.endswith(_NORMS):
                w = (1.0 + w.astype(mx.float32)).astype(w.dtype)
            out[key] = w
        return super().sanitize(out)
