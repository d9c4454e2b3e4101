"""The CPU kernels' GGUF block repack (kernels/cpu/repack.cpp) gives the numpy repack's exact
bytes for every type it takes (codes, and fp16 scales/biases: rounding, subnormals, overflow to
inf, NaN payloads), decides the fp16-overflow fallback the same way, and a load without the
kernels repacks in numpy as before."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from build_tools import needs_cpu_kernel_tools
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

sys.path.insert(0, str(Path(__file__).parent))
from gguf_fixtures import random_blocks  # noqa: E402

from mlxgen import backends  # noqa: E402
from mlxgen.backends.cpu import ext as cpu_ext  # noqa: E402
from mlxgen.loading import gguf as loader, gguf_quants  # noqa: E402

pytestmark = needs_cpu_kernel_tools
KERNEL_TYPES = sorted(gguf_quants.KERNEL_TYPES)


@pytest.fixture(scope="module")
def repack(ext):
    return ext.repack_blocks


def f32_alloc(shape, dtype):
    """The loader's allocator for a float32 model: float16 parts come back as float32 arrays."""
    return np.empty(shape, np.float32 if np.dtype(dtype) == np.float16 else dtype)


def numpy_path(raw, qtype, alloc=np.empty):
    """(triplet, kept): today's numpy repack (its bytes even where the loader would not keep
    them) and whether the loader keeps the tensor quantized."""
    made = []

    def recording(shape, dtype):
        made.append(alloc(shape, dtype))
        return made[-1]

    with np.errstate(all="ignore"):
        if qtype in loader.NATIVE_BITS:
            out = gguf_quants.in_row_chunks(raw, qtype, lambda r: loader._repack_native(r, qtype),
                                            recording)
            return out, bool(np.isfinite(out[2]).all())
        kept = gguf_quants.repack_k(raw, qtype, recording) is not None
        return made, kept


def kernel_path(raw, qtype, repack, alloc=np.empty):
    bits = loader.NATIVE_BITS.get(qtype) or gguf_quants.K_BITS[qtype]
    out, scales_ok, biases_ok = gguf_quants.kernel_repack(raw, qtype, bits, alloc, repack)
    return out, biases_ok if qtype in loader.NATIVE_BITS else scales_ok and biases_ok


def assert_same(raw, qtype, repack, alloc=np.empty):
    want, want_kept = numpy_path(raw, qtype, alloc)
    got, got_kept = kernel_path(raw, qtype, repack, alloc)
    assert got_kept == want_kept
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8))
    return want_kept


def random_raw(qtype, rows, cols, rng, any_bytes=False):
    if qtype in gguf_quants.K_BITS and not any_bytes:
        return random_blocks((rows, cols), qtype, rng)
    block, size = GGML_QUANT_SIZES[qtype]  # every byte pattern: NaN/inf/subnormal fp16 scales
    return rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_random_blocks_identical(qtype, repack):
    rng = np.random.default_rng(int(qtype))
    for rows, cols in [(1, 256), (13, 768), (70, 512)]:
        for alloc in (np.empty, f32_alloc):
            assert_same(random_raw(qtype, rows, cols, rng), qtype, repack, alloc)
            assert_same(random_raw(qtype, rows, cols, rng, any_bytes=True), qtype, repack, alloc)


def _set_f16(raw, qtype, at, values):
    blocks = raw.reshape(raw.shape[0], -1, GGML_QUANT_SIZES[qtype][1])
    blocks[..., at : at + 2] = np.asarray(values, np.float16).reshape(
        blocks.shape[:2])[..., None].view(np.uint8)


D_AT = {QT.Q4_0: 0, QT.Q4_1: 0, QT.Q5_0: 0, QT.Q5_1: 0, QT.Q8_0: 0, QT.Q4_K: 0, QT.Q5_K: 0,
        QT.Q6_K: 208}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's products of inf and NaN
@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_every_fp16_scale(qtype, repack):
    """d takes every fp16 bit pattern (a K-quant every 4th: each exponent, subnormals, the
    largest, inf, NaN): products round to the same fp16 (or overflow to inf alike), widened to
    float32 the same."""
    rng = np.random.default_rng(1)
    block = GGML_QUANT_SIZES[qtype][0]
    step = 4 if qtype in gguf_quants.K_BITS else 1
    rows = 256 // step
    raw = random_raw(qtype, rows, 256 * block, rng)
    _set_f16(raw, qtype, D_AT[qtype], np.arange(0, 65536, step, dtype=np.uint32).astype(np.uint16)
             .view(np.float16))
    if qtype in (QT.Q4_1, QT.Q5_1, QT.Q4_K, QT.Q5_K):  # m / dmin: finite, so the tensor is kept
        _set_f16(raw, qtype, 2, rng.uniform(-1, 1, rows * 256))
    for alloc in (np.empty, f32_alloc):
        assert_same(raw, qtype, repack, alloc)
    finite = raw.copy()  # the same without the non-finite d: a tensor that is kept quantized
    blocks = finite.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    d = blocks[:, D_AT[qtype] : D_AT[qtype] + 2].copy().view(np.float16)
    d[~np.isfinite(d)] = 0
    blocks[:, D_AT[qtype] : D_AT[qtype] + 2] = d.view(np.uint8)
    kept = assert_same(finite, qtype, repack, f32_alloc)
    assert kept == (qtype in (QT.Q4_1, QT.Q5_1))  # the others' products overflow near 65504


def test_q6k_crafted_groups(repack):
    """Q6_K's cases: clash groups (scales equal and opposite, incl. -128/127 near it), zero
    scales, one zero, equal scales; with tiny (subnormal), ordinary and huge d."""
    rng = np.random.default_rng(6)
    pairs = [(5, -5), (-5, 5), (127, -127), (-128, 127), (0, 0), (0, 9), (-9, 0), (7, 7), (-128, -128),
             (1, -2), (3, 100), (-1, 1)]
    raw = random_raw(QT.Q6_K, len(pairs) * 3, 256 * 4, rng)
    blocks = raw.reshape(-1, 210)
    sc = blocks[:, 192:208].view(np.int8)
    sc[:] = np.array(pairs * (sc.size // 2 // len(pairs) + 1), np.int8).reshape(-1)[: sc.size].reshape(
        sc.shape)
    d = rng.choice(np.array([2**-24, 3 * 2**-20, 0.01, 1.0, 8.0], np.float16), blocks.shape[0])
    blocks[:, 208:210] = d[:, None].view(np.uint8)
    for alloc in (np.empty, f32_alloc):
        assert assert_same(raw, QT.Q6_K, repack, alloc)
    blocks[0, 208:210] = np.array([60000], np.float16).view(np.uint8)  # -128 * scale overflows
    assert not assert_same(raw, QT.Q6_K, repack)


def test_loader_uses_it_and_gets_the_same_mlx_arrays(ext):
    """Through _tensor_arrays: the kernels' repack into their unfilled MLX arrays (`empty`)."""
    rng = np.random.default_rng(3)
    for qtype in (QT.Q5_0, QT.Q6_K, QT.Q8_0):
        raw = random_raw(qtype, 40, 512, rng)
        if qtype in loader.NATIVE_BITS:  # finite d: kept
            _set_f16(raw, qtype, 0, rng.uniform(1e-3, 1e-2, 40 * 16))
        t = loader.TensorInfo("w", (40, 512), qtype, 0, raw.nbytes)
        for dtype in (mx.float16, mx.float32):
            want = loader._tensor_arrays(raw.reshape(-1), t, True, dtype)
            got = loader._tensor_arrays(raw.reshape(-1), t, True, dtype, ext)
            assert len(got) == len(want) == 3
            assert all(g.dtype == w.dtype and mx.array_equal(g, w).item() for g, w in zip(got, want))
    raw = random_raw(QT.Q8_0, 4, 64, rng)
    _set_f16(raw, QT.Q8_0, 0, [1000.0] * 8)  # -128 d overflows fp16: dequantized, as in numpy
    t = loader.TensorInfo("w", (4, 64), QT.Q8_0, 0, raw.nbytes)
    got = loader._tensor_arrays(raw.reshape(-1), t, True, mx.float16, ext)
    want = loader._tensor_arrays(raw.reshape(-1), t, True, mx.float16)
    assert len(got) == len(want) == 1 and mx.array_equal(got[0], want[0]).item()


def test_threads_agree_and_bad_arguments_are_refused(repack):
    raw = random_raw(QT.Q4_K, 300, 512, np.random.default_rng(4))
    one, *_ = gguf_quants.kernel_repack(raw, QT.Q4_K, 4, np.empty, lambda *a: repack(*a, threads=1))
    many, *_ = gguf_quants.kernel_repack(raw, QT.Q4_K, 4, np.empty, lambda *a: repack(*a, threads=7))
    assert all((a == b).all() for a, b in zip(one, many))
    codes, scales, biases = one
    with pytest.raises(ValueError, match="unsupported GGML type"):
        repack(raw, int(QT.Q3_K), codes, scales, biases)
    with pytest.raises(ValueError, match="output shapes"):
        repack(raw, int(QT.Q4_K), codes[:-1], scales[:-1], biases[:-1])
    with pytest.raises(ValueError, match="whole number of blocks"):
        repack(raw[:, :-1], int(QT.Q4_K), codes, scales, biases)
    with pytest.raises(ValueError, match="both float16 or both float32"):
        repack(raw, int(QT.Q4_K), codes, scales, biases.astype(np.float32))


def test_without_the_kernels_the_numpy_repack_runs(monkeypatch, tmp_path):
    """MLXGEN_CPU_KERNELS=off, or no build for these sources (a load never starts one): None."""
    monkeypatch.setenv("MLXGEN_CPU_KERNELS", "off")
    assert backends.gguf_repack() is None
    monkeypatch.setenv("MLXGEN_CPU_KERNELS", "auto")
    monkeypatch.setattr(cpu_ext, "build_dir", lambda: tmp_path / "never-built")
    monkeypatch.setattr(cpu_ext, "build", lambda: pytest.fail("a load started a kernel build"))
    assert cpu_ext.built() is None and backends.gguf_repack() is None


def test_empty_is_an_mlx_array_of_the_shape(ext):
    a = ext.empty([3, 5], mx.float16)
    assert isinstance(a, mx.array) and a.shape == (3, 5) and a.dtype == mx.float16
    view = np.array(a, copy=False)
    view[:] = 2  # written through numpy, seen by MLX
    assert mx.array_equal(a, mx.full((3, 5), 2, mx.float16)).item()
    with pytest.raises(ValueError, match="negative"):
        ext.empty([-1], mx.uint32)


def test_real_model_first_load_identical(ext):
    """SmolLM2 (Q4_1, Q8_0) through the kernels: the numpy path's weights, bit for bit."""
    path = Path(os.environ["MLXGEN_TEST_SMOLLM2_GGUF"])
    if not path.is_file():
        pytest.skip(f"{path} missing")
    want = loader.read_gguf(path, scale_dtype=mx.float32, projection_scale_dtype=mx.float16)
    got = loader.read_gguf(path, scale_dtype=mx.float32, projection_scale_dtype=mx.float16,
                           repack=ext)
    assert got.quantization == want.quantization and got.weights.keys() == want.weights.keys()
    for name, w in want.weights.items():
        g = got.weights[name]
        assert g.dtype == w.dtype and mx.array_equal(g, w).item(), name


def test_load_repacks_through_the_kernels(ext, tmp_path, monkeypatch):
    """mlxgen.load on a CPU with the kernels built repacks the quantized tensors with them, and
    the model's parameters equal a numpy-repacked load's."""
    import types

    import mlxgen
    from gguf_fixtures import write_synthetic

    syn = write_synthetic(tmp_path / "m.gguf", "llama")
    seen = []

    def spy(raw, qtype, *out, **kw):
        seen.append(QT(qtype))
        return ext.repack_blocks(raw, qtype, *out, **kw)

    monkeypatch.setattr(backends, "gguf_repack",
                        lambda: types.SimpleNamespace(repack_blocks=spy, empty=ext.empty))
    model, _ = mlxgen.load(str(syn.path), quantized="keep", cache=False)
    monkeypatch.setattr(backends, "gguf_repack", lambda: None)  # the numpy repack
    want, _ = mlxgen.load(str(syn.path), quantized="keep", cache=False)
    kernel_types = {q for q in syn.qtypes.values() if q in gguf_quants.KERNEL_TYPES}
    assert kernel_types and set(seen) == kernel_types
    from mlx.utils import tree_flatten

    got = dict(tree_flatten(model.parameters()))
    for name, w in tree_flatten(want.parameters()):
        assert mx.array_equal(got[name], w).item(), name
