"""The same kernel cases on a real Metal GPU through mx.fast.metal_kernel (Apple silicon only).

Run on a Mac with `pytest -m gpu -rs tests/test_kernels_gpu.py`; elsewhere every test is
skipped with the reason. The float32 reference is the MLX composition computed on the CPU
stream, the same reference CI uses (the GPU's own rope may differ from it in the last bits of
its frequencies, which large positions amplify)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from kernel_cases import (DECODE_CASES, ROPE_CASES, DecodeCase, check, check_decode_case,
                          check_rope_case, decode_inputs)

from mlxgen.backends.metal import (KernelDispatch, bench_kernels, decode_attention_composition,
                                   decode_attention_prerope, format_table, unavailable_reason)

REASON = unavailable_reason()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(REASON is not None, reason=f"needs a Metal GPU: {REASON}")]
METAL = mx.fast.metal_kernel if REASON is None else None


@pytest.mark.parametrize("case", ROPE_CASES, ids=str)
def test_fused_rope_on_metal(case):
    check_rope_case(case, METAL)


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_decode_attention_prerope_on_metal(case):
    check_decode_case(case, METAL)


@pytest.mark.parametrize("n_keys", [4096, 32768])
def test_long_context_decode_on_metal(n_keys):
    """Long contexts exercise the default split plan; positions up to 32k."""
    check_decode_case(DecodeCase(1, 32, 8, 1, 128, n_keys, n_keys + 256, mx.float16), METAL)


def test_auto_dispatch_benchmarks_once_and_records(tmp_path):
    d = KernelDispatch("auto", path=tmp_path / "decisions.json")
    case = DECODE_CASES[1]
    q, k, v, rope = decode_inputs(case)
    out = decode_attention_prerope(q, k, v, case.n_keys, rope, 0.1, dispatch=d)
    ref = decode_attention_composition(q, k, v, case.n_keys, rope, 0.1)
    check(out, ref, case.dtype, 0, "auto dispatch")
    (decision,) = d.decisions().values()
    assert decision["note"] == "" and decision["kernel_us"] > 0, decision


def test_bench_kernels_table_on_metal(capsys):
    rows = bench_kernels(shapes=[("llama-3-8b", 1, 32, 8, 1, 128)], keys=[2048])
    print(format_table(rows))
    assert all(r["kernel_us"] and r["composition_us"] for r in rows), rows
