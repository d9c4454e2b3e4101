"""Model layers with our Metal kernels behind them, swapped in at load (this package's __init__).

Each keeps MLX's composition for whatever its kernel does not cover, and decode steps only look up
decisions measured before generation started."""

from __future__ import annotations

import mlx.core as mx

from ...models.attention import Attention
from ...models.rope import RoPE
from .dispatch import KernelDispatch
from .ops import DECODE_ROWS, decode_attention_prerope, fused_rope


class KernelRoPE(RoPE):
    dispatch: KernelDispatch  # set at install

    def pair(self, q: mx.array, k: mx.array, offset: int | mx.array = 0) -> tuple[mx.array, mx.array]:
        # q and k in one launch where measured faster; one tensor alone stays on mx.fast.rope.
        if self.mscale != 1.0:  # (the kernel does not apply YaRN's / LongRoPE's factor)
            return super().pair(q, k, offset)
        return fused_rope(q, k, self, offset, dispatch=self.dispatch)


class KernelAttention(Attention):
    dispatch: KernelDispatch  # set at install

    def attend(self, q: mx.array, k: mx.array, v: mx.array, cache, last_only: bool) -> mx.array:
        # Decode steps over a pre-RoPE cache: keys rotated in registers while they are read.
        # (A windowed cache needs a mask, and a scaled or partial RoPE a rotation, the kernel lacks.)
        if (cache is None or not cache.pre_rope or q.shape[2] > DECODE_ROWS or self.window
                or self.rope.mscale != 1.0 or self.rope.dims != self.head_dim):
            return super().attend(q, k, v, cache, last_only)
        cache.update_and_fetch(k, v)
        # Whole buffers, not slices: the kernel reads the first `offset` rows without a copy.
        out = decode_attention_prerope(q, cache.keys, cache.values, cache.offset, self.rope,
                                       self.scale, dispatch=self.dispatch)
        return out[:, :, -1:] if last_only else out


SWAPS = {RoPE: KernelRoPE, Attention: KernelAttention}
