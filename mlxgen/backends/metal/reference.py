"""RoPE parameters in the form the kernels take, and the MLX compositions the kernels replace.

The compositions are the reference in every test and what runs whenever a kernel is not used
(always on the CPU)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx


@dataclass(frozen=True, eq=False)
class RopeParams:
    """Everything `mx.fast.rope` needs; `periods` (base**(2i/d), possibly rescaled) replaces `base`."""

    dims: int
    traditional: bool = False
    base: float | None = 10000.0
    scale: float = 1.0
    periods: mx.array | None = None
    _inv: list = field(default_factory=list, repr=False)  # memo for inv_freq()

    @classmethod
    def from_rope(cls, rope) -> "RopeParams":
        """From mlxgen.models.rope.RoPE (or anything with the same attributes)."""
        if isinstance(rope, RopeParams):
            return rope
        periods = getattr(rope, "_periods", None)
        return cls(rope.dims, bool(rope.traditional), None if periods is not None else rope.base,
                   float(rope.scale), periods)

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=self.traditional,
                            base=None if self.periods is not None else self.base,
                            scale=self.scale, offset=offset, freqs=self.periods)

    def inv_freq(self) -> mx.array:
        """Per-pair angle per position (dims/2,) float32, position scale folded in.

        Computed on the CPU stream exactly as MLX's rope computes it there, so kernel and
        composition agree to float32 rounding even at large positions, where a 1-ulp
        difference in a frequency is a visible angle error."""
        if not self._inv:
            half = self.dims // 2
            with mx.stream(mx.cpu):
                if self.periods is not None:
                    inv = mx.reciprocal(self.periods.astype(mx.float32))
                else:
                    inv = mx.exp(-mx.arange(half, dtype=mx.float32) * (math.log(self.base) / half))
                inv = inv * self.scale if self.scale != 1.0 else inv
                mx.eval(inv)
            self._inv.append(inv)
        return self._inv[0]

    def key(self) -> str:
        table = "table" if self.periods is not None else "base"
        return f"r{self.dims}-{'trad' if self.traditional else 'half'}-{table}"


def rope_composition(q: mx.array, k: mx.array, rope: RopeParams, offset: int | mx.array,
                     k_dtype: mx.Dtype | None = None) -> tuple[mx.array, mx.array]:
    k_rot = rope(k, offset)
    return rope(q, offset), k_rot if k_dtype is None else k_rot.astype(k_dtype)


def decode_attention_composition(q: mx.array, k_cache: mx.array, v_cache: mx.array, n_keys: int,
                                 rope: RopeParams, scale: float, pos0: int = 0) -> mx.array:
    """Rotate all n_keys cached keys (key j at position pos0 + j), rotate the Lq queries to the
    last Lq positions, then SDPA (causal within the queries when Lq > 1)."""
    lq = q.shape[2]
    keys = rope(k_cache[:, :, :n_keys, :], pos0)
    q = rope(q, pos0 + n_keys - lq)
    return mx.fast.scaled_dot_product_attention(
        q, keys, v_cache[:, :, :n_keys, :], scale=scale, mask="causal" if lq > 1 else None)
