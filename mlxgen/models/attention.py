"""The one attention step shared by every model: project -> (q/k norm) -> rope/cache seam -> sdpa."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError
from .base import ModelArgs
from .rope import RoPE


def make_rope(args: ModelArgs, base: float | None = None, scaling: dict | None = None) -> RoPE:
    """The model's RoPE (a layer kind with its own base, e.g. Gemma's local layers, passes it)."""
    return RoPE(
        int(args.head_dim * args.partial_rotary_factor),
        base=args.rope_theta if base is None else base,
        traditional=args.rope_traditional,
        scaling=args.rope_scaling if base is None else scaling,
        freq_factors=args.rope_freq_factors,
        max_position_embeddings=args.max_position_embeddings,
    )


def window_mask(n: int, window: int) -> mx.array:
    """(n, n) bool: causal attention limited to the last `window` positions."""
    q, k = mx.arange(n)[:, None], mx.arange(n)[None]
    return (k <= q) & (k > q - window)


class Attention(nn.Module):
    # MLX's fused attention; a backend may install another at load (mlxgen/backends).
    sdpa = staticmethod(mx.fast.scaled_dot_product_attention)

    def __init__(self, args: ModelArgs, window: int | None = None, rope: RoPE | None = None):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = hd = args.head_dim
        self.scale = (args.query_pre_attn_scalar or hd) ** -0.5
        self.window = window  # sliding window of this layer (None: sees every earlier token)
        dim = args.hidden_size
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=args.attention_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=args.attention_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=args.o_proj_bias)
        if args.qk_norm:
            self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.rope = rope if rope is not None else make_rope(args)

    def __call__(self, x: mx.array, cache=None, last_only: bool = False) -> mx.array:
        """Attention output for every position, or with last_only for the last one (the keys
        and values of every position still go to the cache)."""
        B, L, _ = x.shape
        q = self.split_heads(self.q_proj(x), self.n_heads)
        k = self.split_heads(self.k_proj(x), self.n_kv_heads)
        v = self.split_heads(self.v_proj(x), self.n_kv_heads)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        if L > 1:
            q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        out = self.attend(q, k, v, cache, last_only)
        if out.shape[2] == 1:  # one query: (B, H, 1, D) is already the features' order
            return self.o_proj(out.reshape(B, 1, -1))
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, out.shape[2], -1))

    def split_heads(self, t: mx.array, n: int) -> mx.array:
        """(B, L, n * D) -> (B, L, n, D); one position goes straight to (B, n, 1, D), the layout
        attention takes: its transpose would be a graph node that moves nothing."""
        B, L, _ = t.shape
        return t.reshape(B, n, 1, self.head_dim) if L == 1 else t.reshape(B, L, n, self.head_dim)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, cache, last_only: bool) -> mx.array:
        """The seam: the cache decides when keys are rotated and which keys each query sees
        (mlxgen/cache.py; chunk recompute in mlxgen/reuse attends from scattered positions)."""
        q, k, v, mask = self.rotate(q, k, v, cache, last_only)
        return self.sdpa(q, k, v, scale=self.scale, mask=mask)

    def rotate(self, q: mx.array, k: mx.array, v: mx.array, cache, last_only: bool) -> tuple:
        """(queries, keys, values, mask) ready to attend: rotated, cached, windowed."""
        if cache is None:
            q, k = self.rope.pair(q, k)
            n = q.shape[2]
            if self.window is not None and n > self.window:
                mask = window_mask(n, self.window)
            else:
                mask = "causal" if n > 1 else None
        else:
            if getattr(cache, "window", None) != self.window:
                raise ConfigError(
                    f"this layer attends through a sliding window of {self.window} tokens but its "
                    f"cache was made for {getattr(cache, 'window', None)}; make caches with "
                    "model.make_cache()."
                )
            q, k, v = cache.rotate_and_update(q, k, v, self.rope)
            mask = cache.attention_mask(q.shape[2])
        if last_only:  # the last query sees every key that a given mask's last row allows
            q, mask = q[:, :, -1:], (mask[..., -1:, :] if isinstance(mask, mx.array) else None)
        return q, k, v, mask
