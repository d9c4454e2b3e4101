"""Every kernel source in kernels/ run through the CPU emulator and checked against the MLX
composition: float32/float16/bfloat16, head dims 64/128, GQA groups 1/4/7 and MQA, 1-8
queries, ragged key counts and splits, positions > 0, every output element checked."""

from __future__ import annotations


import mlx.core as mx
import pytest
from build_tools import needs_gxx
from kernel_cases import (DECODE_CASES, ROPE_CASES, TOL, F32, check, check_decode_case,
                          check_rope_case, fresh_seed, rope_params)

from metal_emulator import metal_kernel
from mlxgen.backends.metal import (KernelDispatch, decode_attention_composition,
                                   decode_attention_prerope, fused_rope, rope_composition)
from mlxgen.backends.metal.launch import SPECS

pytestmark = needs_gxx

SEEN: set[str] = set()


def factory(**kw):
    """The emulator, recording which kernel sources ran."""
    kernel = metal_kernel(**kw)

    def run(**call):
        SEEN.add(kw["name"])
        return kernel(**call)

    return run


@pytest.mark.parametrize("case", ROPE_CASES, ids=str)
def test_fused_rope_matches_mlx(case):
    check_rope_case(case, factory)


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_decode_attention_prerope_matches_mlx(case):
    check_decode_case(case, factory)


def test_public_ops_use_the_kernel_when_dispatch_says_so():
    """fused_rope / decode_attention_prerope through a dispatcher whose kernels run emulated."""
    seed = fresh_seed()
    d = KernelDispatch("on", available=True, factory=factory)
    rope = rope_params("default", 64, False)
    q, k = mx.random.normal((1, 4, 1, 64)), mx.random.normal((1, 2, 1, 64))
    q_out, k_out = fused_rope(q, k, rope, 9, dispatch=d)
    q_ref, k_ref = rope_composition(q, k, rope, 9)
    check(q_out, q_ref, F32, seed, "fused_rope q")
    check(k_out, k_ref, F32, seed, "fused_rope k")
    kc, vc = mx.random.normal((1, 2, 64, 64)), mx.random.normal((1, 2, 64, 64))
    out = decode_attention_prerope(q, kc, vc, 50, rope, 0.125, dispatch=d)
    check(out, decode_attention_composition(q, kc, vc, 50, rope, 0.125), F32, seed, "decode")


def test_every_kernel_source_ran_through_the_emulator():
    if len(SEEN) < len(SPECS):  # when run alone, run one small case of each
        test_fused_rope_matches_mlx(ROPE_CASES[0])
        test_decode_attention_prerope_matches_mlx(DECODE_CASES[4])
    assert SEEN == {s.name for s in SPECS}
    assert set(TOL) == {mx.float32, mx.float16, mx.bfloat16}
