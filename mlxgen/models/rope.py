"""RoPE variants expressed as frequency tables for mx.fast.rope.

Every variant reduces to `mx.fast.rope(x, offset=...)` with either a base or an explicit table of
per-pair periods, so the cache and the kernels can move the rotation anywhere (DESIGN.md). YaRN and
LongRoPE also scale the rotated features by an attention factor (`mscale`), as transformers scales
its cos/sin tables."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


class RoPE(nn.Module):
    """Rotary embedding for `dims` features; call as rope(x, offset) with x shaped (B, H, L, D)."""

    def __init__(
        self,
        dims: int,
        base: float,
        traditional: bool = False,
        scaling: dict | None = None,
        freq_factors: list[float] | None = None,
        max_position_embeddings: int | None = None,
    ):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        self.base = base
        self.scale = 1.0
        self.mscale = 1.0  # attention factor on the rotated features (YaRN, LongRoPE)
        rope_type = (scaling or {}).get("rope_type", "default")
        periods = None
        if rope_type == "linear":
            self.scale = 1.0 / float(_need(scaling, "factor", rope_type))
        elif rope_type == "llama3":
            periods = _llama3_periods(dims, base, scaling)
        elif rope_type == "yarn":
            periods, self.mscale = _yarn(dims, base, scaling, max_position_embeddings)
        elif rope_type in ("longrope", "su"):
            periods, self.mscale = _longrope(dims, base, scaling, max_position_embeddings)
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
        out = mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=None if self._periods is not None else self.base,
            scale=self.scale,
            offset=offset,
            freqs=self._periods,
        )
        if self.mscale == 1.0:
            return out
        if self.dims == x.shape[-1]:
            return out * self.mscale
        # Partial rotary: only the rotated features carry the factor.
        return mx.concatenate([out[..., : self.dims] * self.mscale, out[..., self.dims :]], axis=-1)

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


def _need(scaling: dict, key: str, rope_type: str):
    if scaling.get(key) is None:
        raise UnsupportedModelError(
            f"rope scaling {rope_type!r} needs {key!r}, which the config lacks; the config is "
            "incomplete."
        )
    return scaling[key]


def _original_context(scaling: dict, rope_type: str, max_positions: int | None) -> tuple[float, int]:
    # (factor, original context): a config may give the factor or only the two lengths.
    original = int(_need(scaling, "original_max_position_embeddings", rope_type))
    factor = scaling.get("factor")
    if factor is None:
        if max_positions is None:
            raise UnsupportedModelError(f"rope scaling {rope_type!r} needs 'factor'.")
        factor = max_positions / original
    return float(factor), original


def _yarn(dims: int, base: float, scaling: dict, max_positions: int | None) -> tuple[mx.array, float]:
    """YaRN (transformers' `yarn`): low frequencies interpolated by `factor`, high ones kept, a
    linear ramp between, and the attention factor 0.1 ln(factor) + 1 (or from mscale)."""
    factor, original = _original_context(scaling, "yarn", max_positions)

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = get_mscale(factor, m) / get_mscale(factor, m_all) if m and m_all else get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    periods = _base_periods(dims, base)
    # inverse frequency: extrapolated (1/period) below the ramp, interpolated (1/(factor period)) above
    inv = (1 / (factor * periods)) * ramp + (1 / periods) * (1 - ramp)
    return 1 / inv, float(attention)


def _longrope(dims: int, base: float, scaling: dict, max_positions: int | None) -> tuple[mx.array, float]:
    """LongRoPE / "su" (Phi-3): per-pair period factors. The long factors are used where the
    configured context exceeds the original one (as mlx-lm), else the short ones; transformers
    switches per forward pass on the sequence length instead, which a cache cannot."""
    factor, original = _original_context(scaling, "longrope", max_positions)
    long = max_positions is not None and max_positions > original
    factors = _need(scaling, "long_factor" if long else "short_factor", "longrope")
    if len(factors) != dims // 2:
        raise UnsupportedModelError(
            f"longrope factors have {len(factors)} entries; the rotated head size {dims} needs "
            f"{dims // 2}. The config is inconsistent."
        )
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return _base_periods(dims, base) * mx.array(factors, dtype=mx.float32), float(attention)
