"""The one attention step shared by every model: project -> (q/k norm) -> rope/cache seam -> sdpa."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import backend, cpu_ops
from .base import ModelArgs
from .linear import Linear
from .norm import RMSNorm
from .rope import RoPE


def make_rope(args: ModelArgs) -> RoPE:
    return RoPE(
        args.head_dim,
        base=args.rope_theta,
        traditional=args.rope_traditional,
        scaling=args.rope_scaling,
        freq_factors=args.rope_freq_factors,
    )


def sdpa():
    """MLX's fused attention, or on the CPU the BLAS + fast-softmax form (mlxgen/cpu_ops.py)."""
    if backend.fast_cpu_ops():
        return cpu_ops.scaled_dot_product_attention
    return mx.fast.scaled_dot_product_attention


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = hd = args.head_dim
        self.scale = hd**-0.5
        dim = args.hidden_size
        self.q_proj = Linear(dim, self.n_heads * hd, bias=args.attention_bias)
        self.k_proj = Linear(dim, self.n_kv_heads * hd, bias=args.attention_bias)
        self.v_proj = Linear(dim, self.n_kv_heads * hd, bias=args.attention_bias)
        self.o_proj = Linear(self.n_heads * hd, dim, bias=args.o_proj_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm = RMSNorm(hd, eps=args.rms_norm_eps)
        self.rope = make_rope(args)

    def __call__(self, x: mx.array, cache=None, last_only: bool = False) -> mx.array:
        """Attention output for every position, or with last_only for the last one (the keys
        and values of every position still go to the cache)."""
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        # The seam: the cache decides when keys are rotated and which keys each query sees
        # (see mlxgen/cache.py; chunk recompute in mlxgen/reuse attends from scattered positions).
        out = None if cache is None else cache.fused_attention(q, k, v, self.rope, self.scale)
        if out is None:
            if cache is None:
                q, k = self.rope(q), self.rope(k)
                mask = "causal" if L > 1 else None
            else:
                q, k, v = cache.rotate_and_update(q, k, v, self.rope)
                mask = cache.attention_mask(L)
            if last_only:  # the last query sees every key that a given mask's last row allows
                q, mask = q[:, :, -1:], (mask[..., -1:, :] if isinstance(mask, mx.array) else None)
            out = sdpa()(q, k, v, scale=self.scale, mask=mask)
        elif last_only:
            out = out[:, :, -1:]
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, out.shape[2], -1))
