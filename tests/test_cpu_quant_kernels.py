"""CPU kernels on MLX-affine quantized weights (kernels/cpu/quant.cpp via mlxgen/backends/cpu/quant.py):
qmatvec against mx.quantized_matmul, dequantize against mx.dequantize, bad input, NaN, threads."""


import mlx.core as mx
import numpy as np
import pytest
from build_tools import needs_cpu_kernel_tools

from mlxgen.backends.cpu import ext as cpu_ext
from mlxgen.backends.cpu import quant as cpu_quant
from mlxgen.errors import ConfigError

pytestmark = needs_cpu_kernel_tools


def quantized(n: int, k: int, bits: int, group_size: int, dtype=mx.float32, seed: int = 0):
    w = mx.random.normal((n, k), key=mx.random.key(seed)).astype(dtype)
    return mx.quantize(w, group_size=group_size, bits=bits)


def assert_matches_mlx(got: mx.array, x: mx.array, q, s, b, bits: int, group_size: int):
    want = mx.quantized_matmul(x, q, s, b, transpose=True, group_size=group_size, bits=bits)
    # Float32 rounding of a K-term sum: bounded by the sum of |x_i w_i| times a few eps * sqrt(K).
    wd = np.abs(np.array(mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32),
                                       group_size=group_size, bits=bits), dtype=np.float64))
    mag = np.abs(np.array(x, dtype=np.float64)) @ wd.T
    err = np.abs(np.array(got, dtype=np.float64) - np.array(want.astype(mx.float32), dtype=np.float64))
    assert got.dtype == mx.float32 and got.shape == want.shape
    assert (err <= 4e-7 * np.sqrt(x.shape[-1]) * mag + 1e-30).all(), float((err / (mag + 1e-30)).max())


@pytest.mark.parametrize("bits", cpu_quant.BITS)
@pytest.mark.parametrize("group_size", cpu_quant.GROUP_SIZES)
@pytest.mark.parametrize("n", [1, 7, 129])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_qmatvec_equals_quantized_matmul(ext, bits, group_size, n, dtype):
    for k in (group_size, 3 * group_size, 896):
        if k % group_size:
            continue
        q, s, b = quantized(n, k, bits, group_size, dtype, seed=k + n)
        assert s.dtype == dtype  # mx.quantize keeps the input's dtype for scales and biases
        for rows in (*range(1, 9), 17, 32):  # decode steps; a session turn's few dozen rows
            x = mx.random.normal((rows, k), key=mx.random.key(rows))
            assert_matches_mlx(ext.qmatvec(x, q, s, b, bits, group_size, 2), x, q, s, b, bits, group_size)


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_bfloat16_scales_and_leading_dims(ext, bits):
    q, s, b = quantized(33, 2048, bits, 64, mx.bfloat16)  # 32 groups: the vector conversion and its tail
    x = mx.random.normal((2, 3, 2048))
    got = cpu_quant.qmatvec(x, q, s, b, bits, 64)
    assert got.shape == (2, 3, 33)
    assert_matches_mlx(got, x, q, s, b, bits, 64)


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("bias_dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_bias_is_added_in_the_kernel(ext, bits, bias_dtype):
    # Odd n (rows split unevenly over threads), 1 to 17 rows: the kernel's per-row epilogue adds
    # the bias exactly as MLX's `y + bias` (one float32 rounding), so equal bit for bit.
    for n, k, group_size in ((129, 384, 32), (7, 256, 128), (1, 64, 64)):
        q, s, b = quantized(n, k, bits, group_size, mx.float16, seed=n + bits)
        bias = (4 * mx.random.normal((n,), key=mx.random.key(n))).astype(bias_dtype)
        for rows in (1, 3, 17):
            x = mx.random.normal((rows, k), key=mx.random.key(rows))
            got = ext.qmatvec(x, q, s, b, bits, group_size, 2, bias)
            assert got.dtype == mx.float32
            assert mx.array_equal(got, ext.qmatvec(x, q, s, b, bits, group_size, 2) + bias).item()
            want = mx.quantized_matmul(x, q, s, b, transpose=True, group_size=group_size, bits=bits) + bias
            assert_matches_mlx(got - bias, x, q, s, b, bits, group_size)
            assert mx.allclose(got, want.astype(mx.float32), rtol=1e-5, atol=1e-4).item()
    x = mx.random.normal((2, 3, k))  # leading dimensions, and the checked wrapper
    got = cpu_quant.qmatvec(x, q, s, b, bits, group_size, bias=bias)
    assert got.shape == (2, 3, n)
    assert mx.array_equal(got, cpu_quant.qmatvec(x, q, s, b, bits, group_size) + bias).item()


@pytest.mark.parametrize("bias,message", [(mx.zeros((8, 1)), "shape"), (mx.zeros((9,)), "shape"),
                                          (mx.zeros((8,), mx.int32), "float32")])
def test_bad_bias_raises_clearly(ext, bias, message):
    q, s, b = quantized(8, 128, 4, 32)
    x = mx.random.normal((1, 128))
    with pytest.raises(ConfigError, match=message):
        cpu_quant.qmatvec(x, q, s, b, 4, 32, bias=bias)
    with pytest.raises(ValueError, match=message):
        ext.qmatvec(x, q, s, b, 4, 32, 2, bias)


def test_non_contiguous_inputs(ext):
    q, s, b = quantized(64, 256, 6, 32)
    x = mx.random.normal((256, 4)).T  # a transposed view
    got = ext.qmatvec(x, q[::2], s[::2], b[::2], 6, 32, 2)  # every other weight row
    assert_matches_mlx(got, x, q[::2], s[::2], b[::2], 6, 32)
    bias = mx.random.normal((64,))[::2]  # a strided bias, made dense at eval
    assert mx.array_equal(ext.qmatvec(x, q[::2], s[::2], b[::2], 6, 32, 2, bias), got + bias).item()


@pytest.mark.parametrize("bits", cpu_quant.BITS)
@pytest.mark.parametrize("group_size", cpu_quant.GROUP_SIZES)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_dequantize_equals_mlx_exactly(ext, bits, group_size, dtype):
    for n, k in ((1, group_size), (7, 3 * group_size), (129, 896 // group_size * group_size)):
        q, s, b = quantized(n, k, bits, group_size, dtype, seed=n)
        got = cpu_quant.dequantize(q, s, b, bits, group_size)
        # MLX's own float32 dequantization of the same (exactly widened) scales and biases.
        want = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)
        assert got.dtype == mx.float32 and got.shape == (n, k)
        assert mx.array_equal(got, want), f"{bits}-bit, group {group_size}, {dtype}: not bit-exact"


def test_threads_split_rows_exactly(ext):
    # Enough work for the threaded path (n * k >= 2^20) with fewer rows than threads.
    k = 1171 * 128
    for n in (1, 7):
        q, s, b = quantized(n, k, 4, 128)
        x = mx.random.normal((2, k))
        one = ext.qmatvec(x, q, s, b, 4, 128, 1)
        assert mx.array_equal(ext.qmatvec(x, q, s, b, 4, 128, 16), one)  # same sums per row
        assert mx.array_equal(ext.qmatvec(x, q, s, b, 4, 128, 3), one)
        assert mx.array_equal(ext.dequantize(q, s, b, 4, 128, 16), ext.dequantize(q, s, b, 4, 128, 1))


def test_nan_propagates(ext):
    q, s, b = quantized(9, 128, 5, 32)
    x = mx.random.normal((2, 128))
    x_nan = np.array(x)
    x_nan[0, 77] = np.nan
    y = np.array(ext.qmatvec(mx.array(x_nan), q, s, b, 5, 32, 2))
    assert np.isnan(y[0]).all() and not np.isnan(y[1]).any()  # only the row with a NaN input
    s_nan = np.array(s)
    s_nan[3, 2] = np.nan
    s_nan = mx.array(s_nan)
    y = np.array(ext.qmatvec(x, q, s_nan, b, 5, 32, 2))
    assert np.isnan(y[:, 3]).all() and not np.isnan(np.delete(y, 3, axis=1)).any()
    d = np.array(ext.dequantize(q, s_nan, b, 5, 32, 2))
    assert np.isnan(d[3, 64:96]).all() and np.isnan(d).sum() == 32


BAD = [
    (dict(bits=7), "bits must be"),
    (dict(group_size=16), "group_size must be"),
    (dict(w=lambda q: q.astype(mx.int32)), "uint32"),
    (dict(w=lambda q: q[0]), "2-D uint32"),
    (dict(s=lambda s: s[:, :-1]), "must have shape"),
    (dict(b=lambda b: b[:-1]), "must have shape"),
    (dict(b=lambda b: b.astype(mx.float16)), "share one dtype"),
    (dict(s=lambda s: s.astype(mx.int32), b=lambda b: b.astype(mx.int32)), "share one dtype"),
    (dict(w=lambda q: q[:, :5]), "whole|multiple"),  # 5 words: not whole 4-bit groups of 32
    (dict(x=lambda x: x.astype(mx.float16)), "float32"),
    (dict(x=lambda x: x[:, :-32]), "last dimension"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_input_raises_clearly(ext, change, message):
    q, s, b = quantized(8, 128, 4, 32)
    args = dict(x=mx.random.normal((1, 128)), w=q, s=s, b=b, bits=4, group_size=32)
    for key, fn in change.items():
        args[key] = fn(args[key]) if callable(fn) else fn
    call = (args["x"], args["w"], args["s"], args["b"], args["bits"], args["group_size"])
    with pytest.raises(ConfigError, match=message):
        cpu_quant.qmatvec(*call)
    # The extension checks too (it never trusts its caller): ValueError before reading anything.
    with pytest.raises(ValueError, match=message):
        ext.qmatvec(*call, 2)
    if "x" not in change:
        with pytest.raises(ConfigError, match=message):
            cpu_quant.dequantize(*call[1:])
        with pytest.raises(ValueError, match=message):
            ext.dequantize(*call[1:], 2)


def test_fallback_without_kernels(monkeypatch):
    q, s, b = quantized(7, 256, 6, 64, mx.float16)
    x = mx.random.normal((3, 256), key=mx.random.key(5))
    fast, deq = cpu_quant.qmatvec(x, q, s, b, 6, 64), cpu_quant.dequantize(q, s, b, 6, 64)
    monkeypatch.setenv("MLXGEN_CPU_KERNELS", "off")
    slow = cpu_quant.qmatvec(x, q, s, b, 6, 64)
    want = mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64, bits=6)
    assert slow.dtype == mx.float32 and mx.array_equal(slow, want)  # MLX's own op
    assert_matches_mlx(fast, x, q, s, b, 6, 64)
    assert mx.array_equal(cpu_quant.dequantize(q, s, b, 6, 64), deq)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["skylake-avx512", "haswell", "x86-64"])
def test_narrower_vector_builds(tmp_path, arch):
    """The AVX-512 build without VBMI (16-wide, the portable unpack), AVX2 (8-wide) and plain SSE2
    builds, which this AVX-512 VBMI machine otherwise never runs: same checks on a subset (one
    build each, about a minute)."""
    import importlib.util
    import platform
    import subprocess
    import sys

    from mlxgen.backends.sources import read_source

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 builds")
    src = tmp_path / "src"
    src.mkdir()
    for name in cpu_ext.SOURCES:
        text = read_source(name)
        if name.endswith("CMakeLists.txt"):
            assert "-march=native" in text
            text = text.replace("-march=native", f"-march={arch}")
        (src / name.split("/")[-1]).write_text(text)
    for step in (["cmake", "-S", str(src), "-B", str(tmp_path / "b"), f"-DPython_EXECUTABLE={sys.executable}"],
                 ["cmake", "--build", str(tmp_path / "b"), "--parallel", "2"]):
        subprocess.run(step, check=True, capture_output=True, timeout=600)
    lib = next((tmp_path / "b").glob(f"{cpu_ext.MODULE}*.so"))
    spec = importlib.util.spec_from_file_location(cpu_ext.MODULE, lib)
    narrow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(narrow)
    for bits in cpu_quant.BITS:
        for group_size, dtype in ((32, mx.float16), (64, mx.bfloat16), (128, mx.float32)):
            for n, k in ((1, group_size), (7, 3 * group_size), (129, 2048)):
                q, s, b = quantized(n, k, bits, group_size, dtype, seed=n)
                x = mx.random.normal((3, k), key=mx.random.key(k))
                assert_matches_mlx(narrow.qmatvec(x, q, s, b, bits, group_size, 2), x, q, s, b, bits, group_size)
                want = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)
                assert mx.array_equal(narrow.dequantize(q, s, b, bits, group_size, 2), want)
