"""mlxgen's C++ CPU kernels (kernels/cpu/fast_math.cpp via mlxgen/backends/cpu/ext.py): build,
cache, math, and that the CPU backend puts every one of them in a model."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from build_tools import needs_cpu_kernel_tools

from mlxgen import backends
from mlxgen.backends.cpu import ext as cpu_ext
from mlxgen.errors import ConfigError

pytestmark = needs_cpu_kernel_tools


def numerators_reference(scores: np.ndarray, q_len: int, first_visible: int) -> np.ndarray:
    s = scores.astype(np.float64).reshape(-1, scores.shape[-1])
    keys = np.arange(s.shape[1])
    out = np.zeros_like(s)
    for r, row in enumerate(s):
        visible = keys <= first_visible + r % q_len if first_visible >= 0 else keys >= 0
        out[r, visible] = np.exp(row[visible] - row[visible].max())
    return out.reshape(scores.shape)


def test_exp_is_accurate_over_the_softmax_range(ext):
    x = mx.linspace(-87, 0, 300_001)[None]
    got = np.array(ext.softmax_numerators(x, 1, -1)).astype(np.float64)[0]
    want = np.exp(np.array(x, dtype=np.float64)[0])
    assert np.abs(got - want).max() < 1e-7
    assert (np.abs(got - want) / want).max() < 3e-7  # relative: tiny terms stay exact too
    assert got[-1] == 1.0  # the row max maps to exactly 1
    far = ext.softmax_numerators(mx.array([[0.0, -100.0, -mx.inf]]), 1, -1)
    assert far.tolist() == [[1.0, 0.0, 0.0]]  # below exp's float range: exactly 0, no NaN


@pytest.mark.parametrize("rows,q_len,keys", [(7, 7, 7), (2 * 3 * 5, 5, 40), (64, 16, 1000), (9, 9, 3)])
def test_causal_numerators(ext, rows, q_len, keys):
    scores = mx.random.normal((1, rows, keys)) * 4
    first = keys - q_len if keys >= q_len else 0
    got = np.array(ext.softmax_numerators(scores, q_len, first))
    want = numerators_reference(np.array(scores), q_len, first)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


def test_fully_masked_row_is_zero_not_nan(ext):
    got = ext.softmax_numerators(mx.full((2, 5), -mx.inf), 1, -1)
    assert np.array(got).tolist() == [[0.0] * 5] * 2


def test_non_contiguous_inputs(ext):
    scores = mx.random.normal((40, 24)).T  # a transposed view
    got = np.array(ext.softmax_numerators(scores, 1, -1))
    np.testing.assert_allclose(got, numerators_reference(np.array(scores), 1, -1), rtol=2e-6, atol=1e-7)
    g, u = mx.random.normal((33, 70)) * 6, mx.random.normal((70, 33)).T
    np.testing.assert_allclose(np.array(ext.silu_mul(g, u)), np.array(nn.silu(g) * u), rtol=1e-5, atol=1e-6)
    # Made dense at eval time (no Contiguous node): an offset column slice and a broadcast row.
    w = mx.random.normal((100,))
    for x in (mx.random.normal((6, 4, 110))[1:, :, 7:107], mx.broadcast_to(mx.random.normal((100,)), (3, 100))):
        np.testing.assert_allclose(np.array(ext.rms_norm(x, w, 1e-6)), np.array(mx.fast.rms_norm(x, w, 1e-6)),
                                   rtol=1e-5, atol=1e-5)


def test_silu_mul_extremes(ext):
    g = mx.array([-200.0, -88.0, -20.0, -1e-8, 0.0, 1e-8, 20.0, 88.0, 200.0])
    got = np.array(ext.silu_mul(g, mx.ones_like(g)))
    want = np.array(g, dtype=np.float64) / (1 + np.exp(-np.array(g, dtype=np.float64)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("rows,k,n", [(1, 896, 1000), (3, 77, 4099), (8, 64, 5)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matvec(ext, rows, k, n, threads):
    x, w = mx.random.normal((1, rows, k)), mx.random.normal((n, k))
    want = np.array(x, dtype=np.float64) @ np.array(w, dtype=np.float64).T
    np.testing.assert_allclose(np.array(ext.matvec(x, w, threads)), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_takes_the_matvec_kernel_for_few_rows_only(ext, bias, monkeypatch):
    # Decode steps and the last prompt row go to the kernel; a prefill chunk stays on BLAS sgemm.
    from mlxgen.backends.cpu.layers import CpuLinear

    layer = CpuLinear(96, 1100, bias=bias)
    calls = []

    class Counting:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(ext, name)

    monkeypatch.setattr(cpu_ext, "_load", lambda: (Counting(), ""))
    for rows, kernel in ((1, True), (8, True), (9, False)):
        calls.clear()
        x = mx.random.normal((1, rows, 96))
        want = np.array(x, dtype=np.float64) @ np.array(layer.weight, dtype=np.float64).T
        if bias:
            want += np.array(layer.bias, dtype=np.float64)
        got = layer(x)
        assert ("matvec" in calls) == kernel, (rows, calls)
        np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_mlx(ext):
    x = (mx.random.normal((40, 3, 100)) * 5).transpose(1, 0, 2)  # non-contiguous
    w = mx.random.normal((100,))
    np.testing.assert_allclose(np.array(ext.rms_norm(x, w, 1e-6)),
                               np.array(mx.fast.rms_norm(x, w, 1e-6)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dims,offset,table", [(64, 0, False), (64, 4000, False), (32, 17, False), (64, 9, True)])
def test_rope_matches_mlx(ext, traditional, dims, offset, table):
    x = mx.random.normal((2, 11, 5, 64)).transpose(0, 2, 1, 3)  # (B, H, L, D) read through strides
    base, half = 10000.0, dims // 2
    periods = mx.random.uniform(1.0, 5000.0, (half,)) if table else None
    inv = 1.0 / periods if table else mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * (np.log(base) / half))
    got = ext.rope(x, dims, traditional, inv, 0.5, offset)
    want = mx.fast.rope(x, dims, traditional=traditional, base=None if table else base, scale=0.5,
                        offset=offset, freqs=periods)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("offset", [700, "positions"])
def test_cpu_rope_rotates_halves_in_float32(ext, dtype, offset):
    # Stored half-precision K/V placed by reuse: rotated in float32, rounded once to their dtype.
    from mlxgen.backends.cpu.layers import CpuRoPE

    rope = CpuRoPE(64, base=100000.0)
    x = mx.random.normal((1, 3, 17, 64)).astype(dtype)
    off = mx.arange(5, 22) if offset == "positions" else offset
    xt = x.transpose(2, 1, 0, 3) if offset == "positions" else x  # per-token: tokens as batch
    got = rope(xt, off)
    rotated = mx.fast.rope(xt.astype(mx.float32), 64, traditional=False, base=100000.0, scale=1.0,
                           offset=off)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(rotated), rtol=1e-2,
                               atol=1e-2)
    # one rounding, of the float32 rotation (the kernel's for an int offset, MLX's for positions)
    assert mx.array_equal(got, rope(xt.astype(mx.float32), off).astype(dtype)).item()


def test_bad_input_is_refused_with_a_reason(ext):
    with pytest.raises(ValueError, match="weight \\(n, k\\)"):
        ext.matvec(mx.zeros((1, 5)), mx.zeros((3, 4)), 1)
    with pytest.raises(ValueError, match="even dims"):
        ext.rope(mx.zeros((1, 2, 3, 8)), 7, False, mx.ones((3,)), 1.0, 0)
    with pytest.raises(ValueError, match="float32"):
        ext.softmax_numerators(mx.zeros((2, 3), dtype=mx.float16), 1, -1)
    with pytest.raises(ValueError, match="equal shapes"):
        ext.silu_mul(mx.zeros((2, 3)), mx.zeros((3, 2)))
    with pytest.raises(ValueError, match="q_len"):
        ext.softmax_numerators(mx.zeros((2, 3)), 0, -1)


def test_build_is_cached_and_keyed_by_the_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXGEN_CACHE_DIR", str(tmp_path))
    first = cpu_ext.build_dir()
    real = cpu_ext.read_source
    monkeypatch.setattr(cpu_ext, "read_source", lambda name: real(name) + ("\n// edited" if name.endswith(".cpp") else ""))
    assert cpu_ext.build_dir() != first and cpu_ext.build_dir().parent == first.parent


def test_modes(monkeypatch):
    monkeypatch.setenv("MLXGEN_CPU_KERNELS", "off")
    assert cpu_ext.kernels() is None
    monkeypatch.setenv("MLXGEN_CPU_KERNELS", "sometimes")
    with pytest.raises(ConfigError, match="MLXGEN_CPU_KERNELS"):
        cpu_ext.kernels()


def test_failed_build_falls_back_or_raises_when_required(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no cmake, no compiler
    monkeypatch.setattr(cpu_ext.sys, "executable", str(tmp_path / "python"))
    cpu_ext._load.cache_clear()
    try:
        monkeypatch.setenv("MLXGEN_CPU_KERNELS", "auto")
        assert cpu_ext.kernels() is None
        monkeypatch.setenv("MLXGEN_CPU_KERNELS", "on")
        with pytest.raises(cpu_ext.CpuKernelBuildError, match="cmake"):
            cpu_ext.kernels()
    finally:
        cpu_ext._load.cache_clear()


def test_nan_propagates_like_mlx(ext):
    got = np.array(ext.softmax_numerators(mx.array([[0.0, mx.nan, -1.0]]), 1, -1))
    assert np.isnan(got[0, 1]) and got[0, 0] == 1.0
    assert np.isnan(np.array(ext.silu_mul(mx.array([mx.nan] * 9), mx.ones((9,))))).all()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_models_run_through_every_kernel(ext, arch, monkeypatch):
    # Each kernel must be reached from the model (a dropped call would only cost speed, which no
    # output comparison sees), and the logits must equal the MLX-op path's.
    from reuse_helpers import tiny_model, token_ids

    from mlxgen.prefill import prefill

    model, ids = tiny_model(arch), token_ids(40)
    monkeypatch.setenv("MLXGEN_CPU_KERNELS", "off")
    assert backends.prepare(model, "cpu").backend == "cpu"  # fast-math MLX ops, no kernels
    want = prefill(model, ids, model.make_cache())
    calls = []

    class Counting:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(ext, name)

    monkeypatch.setenv("MLXGEN_CPU_KERNELS", "on")
    monkeypatch.setattr(cpu_ext, "_load", lambda: (Counting(), ""))
    backends.prepare(model, "cpu")
    got = prefill(model, ids, model.make_cache())
    assert set(calls) == {"softmax_numerators", "silu_mul", "rms_norm", "rope", "matvec", "decode_attention"}
    assert mx.abs(got - want).max().item() < 1e-4
    # Prepared again for the MLX-only backend, the model calls no kernel at all.
    backends.prepare(model, "mlx")
    calls.clear()
    assert mx.abs(prefill(model, ids, model.make_cache()) - want).max().item() < 1e-4
    assert calls == []


def test_fast_ops_off_and_float16_keep_mlx_ops(monkeypatch):
    from reuse_helpers import tiny_model

    model = tiny_model("qwen3")
    monkeypatch.setenv("MLXGEN_CPU_FAST_OPS", "off")
    assert backends.prepare(model, "cpu").backend == "mlx"
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear
    monkeypatch.setenv("MLXGEN_CPU_FAST_OPS", "on")
    model.set_dtype(mx.float16)  # the Mac profile run on the CPU: MLX's ops, as on the GPU
    assert backends.prepare(model, "cpu").backend == "mlx"
    assert "sdpa" not in model.layers[0].self_attn.__dict__
