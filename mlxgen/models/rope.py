"""RoPE variants expressed as frequency tables for mx.fast.rope.

Every variant reduces to `mx.fast.rope(x, offset=...)` with either a base or an explicit table of
per-pair periods, so the cache and the kernels can move the rotation anywhere (DESIGN.md)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class RoPE(nn.Module):
    """Rotary embedding for `dims` features; call as rope(x, offset) with x shaped (B, H, L, D)."""

    def __init__(
        self,
        dims: int,
        base: float,
        traditional: bool = False,
        scaling: dict | None = None,
        freq_factors: list[float] | None = None,
    ):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        self.base = base
        self.scale = 1.0
        rope_type = (scaling or {}).get("rope_type", "default")
        periods = None
        if rope_type == "linear":
            self.scale = 1.0 / float(scaling["factor"])
        elif rope_type == "llama3":
            periods = _llama3_periods(dims, base, scaling)
        elif rope_type != "default":
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}."
            )
        if freq_factors is not None:
            periods = _base_periods(dims, base) * mx.array(freq_factors, dtype=mx.float32)
        # Stored under a private name so it is not treated as a weight.
        self._periods = periods
        self._inv_freqs = None

    def inverse_frequencies(self) -> mx.array:
        """Radians per position of each rotated pair, computed as mx.fast.rope computes them."""
        if self._inv_freqs is None:
            half = self.dims // 2
            if self._periods is not None:
                self._inv_freqs = mx.reciprocal(self._periods)
            else:
                self._inv_freqs = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * (math.log(self.base) / half))
        return self._inv_freqs

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=None if self._periods is not None else self.base,
            scale=self.scale,
            offset=offset,
            freqs=self._periods,
        )

    def pair(self, q: mx.array, k: mx.array, offset: int | mx.array = 0) -> tuple[mx.array, mx.array]:
        """q and k rotated at the same positions (a backend may fuse the two into one kernel)."""
        return self(q, offset), self(k, offset)


def _base_periods(dims: int, base: float) -> mx.array:
    # Period (in radians^-1) of each rotated pair: base^(2i/d); the angle at position p is p / period.
    return base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)


def _llama3_periods(dims: int, base: float, scaling: dict) -> mx.array:
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    periods = _base_periods(dims, base)
    wavelen = 2 * math.pi * periods
    low_wavelen, high_wavelen = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)
    # Long wavelengths are stretched by `factor`, short ones kept, the band between interpolated.
    interpolated = periods / ((1 - smooth) / factor + smooth)
    scaled = mx.where(wavelen > low_wavelen, periods * factor, periods)
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return mx.where(in_band, interpolated, scaled)
