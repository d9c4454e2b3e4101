"""Kernel test cases shared by the emulation tests (CPU, CI) and the real-GPU tests (Mac).

Every case builds fresh random inputs; `check` compares a kernel result with the float32 MLX
composition element by element (a poisoned, never-written element is NaN and fails)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx

from mlxgen.backends.metal import (DecodePlan, RopeParams, decode_attention_composition, decode_kernel,
                                   rope_composition, rope_kernel)
from mlxgen.models.rope import RoPE

TOL = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 1e-2}
F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16


def fresh_seed() -> int:
    """A new seed per test (printed on failure), so every run draws different inputs."""
    seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    mx.random.seed(seed)
    return seed


def rope_params(kind: str, dims: int, traditional: bool, head_dim: int | None = None) -> RopeParams:
    """default / linear / llama3 / freq-factor variants, through mlxgen's own RoPE module."""
    scaling = {"linear": {"rope_type": "linear", "factor": 4.0},
               "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}.get(kind)
    base = 500000.0 if kind == "llama3" else 10000.0
    return RopeParams.from_rope(RoPE(dims, base, traditional=traditional, scaling=scaling))


def check(out, ref, dtype, seed: int, what: str) -> float:
    """Every element finite and max|out - ref| <= tol * max|ref|; returns the relative error."""
    out32, ref32 = out.astype(F32), ref.astype(F32)
    assert out.shape == ref.shape, f"{what}: shape {out.shape} vs {ref.shape}"
    bad = mx.logical_not(mx.isfinite(out32)).sum().item()
    assert bad == 0, f"{what}: {bad} of {out.size} elements not written or not finite (seed {seed})"
    err = mx.abs(out32 - ref32).max().item() / max(mx.abs(ref32).max().item(), 1e-30)
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]} (seed {seed})"
    return err


@dataclass(frozen=True)
class RopeCase:
    B: int
    Hq: int
    Hk: int
    L: int
    D: int
    dtype: mx.Dtype
    traditional: bool
    kind: str = "default"
    dims: int | None = None      # rotated dims (partial RoPE) if not D
    offset: object = 5           # int, or a tuple of per-batch offsets
    k_dtype: mx.Dtype | None = None

    def __str__(self) -> str:
        return (f"B{self.B}-H{self.Hq}/{self.Hk}-L{self.L}-D{self.D}-{str(self.dtype)[9:]}-"
                f"{'trad' if self.traditional else 'half'}-{self.kind}-r{self.dims or self.D}")


ROPE_CASES = (
    RopeCase(2, 4, 2, 5, 64, F32, False, offset=(3, 1000)),
    RopeCase(2, 4, 2, 5, 64, F32, True, "linear", offset=(0, 7)),
    RopeCase(1, 7, 1, 1, 128, F16, False, "llama3", offset=4093),
    RopeCase(1, 3, 3, 33, 128, BF16, True, offset=17),
    RopeCase(1, 2, 1, 9, 64, F32, False, dims=32, offset=2),
    RopeCase(1, 4, 4, 3, 128, F32, False, "llama3", k_dtype=F16, offset=250),
)


@dataclass(frozen=True)
class DecodeCase:
    B: int
    Hq: int
    Hk: int
    Lq: int
    D: int
    n_keys: int
    capacity: int
    dtype: mx.Dtype
    traditional: bool = False
    kind: str = "default"
    pos0: int = 0
    keys_per_split: int | None = None  # force a split plan (exercises attn_reduce)

    def __str__(self) -> str:
        split = f"-kps{self.keys_per_split}" if self.keys_per_split else ""
        return (f"B{self.B}-H{self.Hq}/{self.Hk}-Lq{self.Lq}-D{self.D}-n{self.n_keys}/"
                f"{self.capacity}-{str(self.dtype)[9:]}-{'trad' if self.traditional else 'half'}-"
                f"{self.kind}-p{self.pos0}{split}")

    def plan(self) -> DecodePlan | None:
        if self.keys_per_split is None:
            return None
        from mlxgen.backends.metal import plan_decode

        base = plan_decode(self.B, self.Hk, self.Hq // self.Hk, self.Lq, self.n_keys)
        kps = self.keys_per_split
        return DecodePlan(base.rows, base.tiles, -(-self.n_keys // kps), kps)


DECODE_CASES = (
    DecodeCase(1, 8, 8, 1, 64, 1, 32, F32),                                   # one key
    DecodeCase(1, 8, 2, 1, 128, 100, 128, F32, True, pos0=3),                 # GQA 4
    DecodeCase(2, 7, 1, 1, 64, 257, 300, F16, kind="llama3"),                 # MQA, group 7
    DecodeCase(1, 8, 1, 8, 128, 77, 96, BF16, kind="linear"),                 # MQA, 8 queries
    DecodeCase(1, 14, 2, 3, 64, 131, 160, F16, True, keys_per_split=32),      # group 7, splits
    DecodeCase(1, 4, 1, 5, 128, 45, 45, F32, keys_per_split=40),              # ragged splits
    DecodeCase(1, 4, 4, 2, 64, 600, 640, BF16),                               # default split plan
    DecodeCase(2, 8, 2, 7, 128, 64, 64, F16, pos0=100),                       # GQA 4, 7 queries
    DecodeCase(1, 32, 8, 1, 128, 1000, 1024, F32, kind="llama3"),             # 8B-like, splits
    DecodeCase(1, 4, 1, 4, 64, 40, 40, F32, True),                            # MQA, 4 queries
    DecodeCase(1, 2, 2, 6, 64, 6, 8, F16),                                    # all keys are new
)


def rope_inputs(c: RopeCase):
    q = mx.random.normal((c.B, c.Hq, c.L, c.D)).astype(c.dtype)
    k = mx.random.normal((c.B, c.Hk, c.L, c.D)).astype(c.dtype)
    off = mx.array(c.offset, dtype=mx.int32) if isinstance(c.offset, tuple) else c.offset
    return q, k, off, rope_params(c.kind, c.dims or c.D, c.traditional)


def decode_inputs(c: DecodeCase):
    """Cache slots past n_keys hold NaN: a kernel that reads them fails the finiteness check."""
    q = mx.random.normal((c.B, c.Hq, c.Lq, c.D)).astype(c.dtype)
    valid = mx.arange(c.capacity)[None, None, :, None] < c.n_keys
    kv = (c.B, c.Hk, c.capacity, c.D)
    k = mx.where(valid, mx.random.normal(kv), mx.nan).astype(c.dtype)
    v = mx.where(valid, mx.random.normal(kv), mx.nan).astype(c.dtype)
    return q, k, v, rope_params(c.kind, c.D, c.traditional)


def check_rope_case(c: RopeCase, factory) -> None:
    """Run the fused RoPE kernel built by `factory` on case c; check it against the float32
    composition on the CPU stream (a GPU's own rope may differ in its frequencies' last bits)."""
    seed = fresh_seed()
    q, k, off, rope = rope_inputs(c)
    q_out, k_out = rope_kernel(q, k, rope, off, factory, k_dtype=c.k_dtype)
    with mx.stream(mx.cpu):
        q_ref, k_ref = rope_composition(q.astype(F32), k.astype(F32), rope, off)
    assert q_out.dtype == c.dtype and k_out.dtype == (c.k_dtype or c.dtype)
    check(q_out, q_ref, c.dtype, seed, f"q {c}")
    check(k_out, k_ref, k_out.dtype, seed, f"k {c}")


def check_decode_case(c: DecodeCase, factory) -> None:
    """Run the pre-RoPE decode attention kernels built by `factory` on case c; check them
    against the float32 composition on the CPU stream."""
    seed = fresh_seed()
    q, k, v, rope = decode_inputs(c)
    scale = c.D**-0.5
    out = decode_kernel(q, k, v, c.n_keys, rope, scale, factory, pos0=c.pos0, plan=c.plan())
    with mx.stream(mx.cpu):
        ref = decode_attention_composition(q.astype(F32), k.astype(F32), v.astype(F32),
                                           c.n_keys, rope, scale, pos0=c.pos0)
    assert out.dtype == c.dtype
    check(out, ref, c.dtype, seed, str(c))
