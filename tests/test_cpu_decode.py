"""CPU decode and memory pieces: the C++ decode attention against MLX's sdpa, the KV cache's
one-allocation prefill (reserve), float16 scales where they are exact, the buffer-cache limit."""

import collections
import re

import mlx.core as mx
import mlx.nn as nn
import pytest
from build_tools import needs_cpu_kernel_tools

from mlxgen import backends
from mlxgen.backends import cpu as cpu_backend
from mlxgen.backends.cpu import layers as cpu_layers
from mlxgen.backends.cpu import ops
from mlxgen.cache import KVCache

kernels = needs_cpu_kernel_tools


def _sdpa(q, k, v, scale):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)


@kernels
@pytest.mark.parametrize("B,H,KV,n,D", [
    (1, 9, 3, 1, 64),      # the first decode step: one key
    (1, 14, 2, 300, 64),   # Qwen2.5's heads, one thread's range
    (2, 8, 8, 37, 80),     # batch, no GQA
    (1, 4, 1, 3001, 33),   # odd head size, keys split over threads (MQA)
])
@pytest.mark.parametrize("threads", [1, 3])
def test_decode_attention_matches_mlx(ext, B, H, KV, n, D, threads):
    q = mx.random.normal((B, H, 1, D), key=mx.random.key(0))
    # Views of a larger buffer, as the cache returns them (rows contiguous, positions strided).
    k = (3 * mx.random.normal((B, KV, n + 7, D), key=mx.random.key(1)))[:, :, :n]
    v = mx.random.normal((B, KV, n + 7, D), key=mx.random.key(2))[:, :, :n]
    got = ext.decode_attention(q, k, v, D**-0.5, threads)
    assert mx.abs(got - _sdpa(q, k, v, D**-0.5)).max().item() < 1e-5  # float32 sums over n keys
    # Keys whose features are strided (a transposed array) give the same result.
    kt = mx.array(k.swapaxes(-1, -2)).swapaxes(-1, -2)
    assert mx.array_equal(ext.decode_attention(q, kt, v, D**-0.5, threads), got).item()


@kernels
@pytest.mark.parametrize("n", [1, 15, 16, 17, 2500])  # whole vectors of halves and the tails
def test_decode_attention_reads_a_float16_cache(ext, n):
    q = mx.random.normal((1, 6, 1, 40), key=mx.random.key(5))
    k = (2 * mx.random.normal((1, 2, n, 40), key=mx.random.key(6))).astype(mx.float16)
    v = mx.random.normal((1, 2, n, 40), key=mx.random.key(7)).astype(mx.float16)
    want = _sdpa(q, k.astype(mx.float32), v.astype(mx.float32), 0.15)
    assert mx.abs(ext.decode_attention(q, k, v, 0.15, 2) - want).max().item() < 1e-5
    with pytest.raises(ValueError, match="must both be float32 or both float16"):
        ext.decode_attention(q, k, v.astype(mx.float32), 0.15, 2)


@kernels
def test_decode_attention_large_scores_and_nan(ext):
    q = mx.full((1, 2, 1, 16), 30.0)
    k = mx.random.normal((1, 1, 600, 16), key=mx.random.key(3))
    v = mx.random.normal((1, 1, 600, 16), key=mx.random.key(4))
    got = ext.decode_attention(q, k, v, 1.0, 2)  # scores ~ +-500: stable (max subtracted)
    assert mx.abs(got - _sdpa(q, k, v, 1.0)).max().item() < 2e-5
    k_nan = mx.concatenate([k[:, :, :5], mx.full((1, 1, 1, 16), mx.nan), k[:, :, 6:]], axis=2)
    assert mx.isnan(ext.decode_attention(q, k_nan, v, 1.0, 2)).all().item()


@kernels
def test_decode_attention_refuses_bad_shapes(ext):
    q, k = mx.zeros((1, 4, 1, 8)), mx.zeros((1, 3, 5, 8))  # 4 heads over 3 KV heads
    with pytest.raises(ValueError, match="multiple of KV"):
        ext.decode_attention(q, k, k, 1.0, 1)
    with pytest.raises(ValueError, match="q \\(B, H, 1, D\\)"):
        ext.decode_attention(mx.zeros((1, 3, 2, 8)), k, k, 1.0, 1)


@kernels
def test_decode_step_goes_to_the_kernel_only_for_one_unmasked_query(ext):
    q1, q2 = mx.random.normal((1, 4, 1, 16)), mx.random.normal((1, 4, 2, 16))
    k, v = mx.random.normal((1, 2, 9, 16)), mx.random.normal((1, 2, 9, 16))
    calls = []

    class Counting:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(ext, name)

    out = ops.scaled_dot_product_attention(q1, k, v, 0.25, None, ext=Counting())
    assert calls == ["decode_attention"] and mx.allclose(out, _sdpa(q1, k, v, 0.25), atol=1e-6).item()
    calls.clear()
    mask = mx.ones((1, 9), mx.bool_)  # a window's mask keeps the general path
    ops.scaled_dot_product_attention(q1, k, v, 0.25, mask, ext=Counting())
    ops.scaled_dot_product_attention(q2, k, v, 0.25, "causal", ext=Counting())
    assert "decode_attention" not in calls


def test_reserve_allocates_a_prompt_once(monkeypatch):
    from reuse_helpers import tiny_model, token_ids

    from mlxgen.prefill import prefill

    model, ids = tiny_model("llama"), token_ids(300)
    backends.prepare(model, "mlx")
    want = model(mx.array(ids)[None])[:, -1, :]  # no cache at all
    sizes = []
    realloc = KVCache._realloc
    monkeypatch.setattr(KVCache, "_realloc", lambda self, drop, needed: (sizes.append(needed),
                                                                         realloc(self, drop, needed)))
    cache = model.make_cache()
    got = prefill(model, ids, cache, 64)
    assert mx.allclose(got, want, atol=1e-4).item()
    assert sizes == [301] * len(cache)  # each layer: the prompt and a decode step, in one buffer
    assert cache[0].keys.shape[2] == 512 and cache[0].offset == 300
    sizes.clear()
    grown = KVCache()  # without reserve a chunked prompt reallocates per chunk
    for start in range(0, 300, 64):
        grown.update_and_fetch(*(mx.zeros((1, 2, min(64, 300 - start), 4)),) * 2)
    assert len(sizes) == 2
    windowed = KVCache(window=64)
    windowed.reserve(700)  # a cache that drops keys grows only as it needs to
    windowed.update_and_fetch(mx.zeros((1, 1, 3, 4)), mx.zeros((1, 1, 3, 4)))
    assert windowed.keys.shape[2] == KVCache.step


def _quantized_tiny(f16_exact: bool):
    from reuse_helpers import tiny_model

    model = tiny_model("qwen2")
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized")
                and m.weight.shape[-1] % 32 == 0)
    model.set_dtype(mx.float32)  # what build_model does on the CPU: float32 scales
    if f16_exact:  # scales a GGUF Q4_1 would have had: float16 values
        for _, m in model.named_modules():
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
                m.scales = m.scales.astype(mx.float16).astype(mx.float32)
                m.biases = m.biases.astype(mx.float16).astype(mx.float32)
    return model


@kernels
def test_float16_scales_only_where_exact_and_outputs_unchanged(ext, monkeypatch):
    from reuse_helpers import token_ids

    monkeypatch.setenv("MLXGEN_KV_DTYPE", "float32")  # the scales alone (float16 K/V: test_cpu_decode_layer)

    from mlxgen.prefill import prefill

    model = _quantized_tiny(f16_exact=True)
    backends.prepare(model, "mlx")
    ids = token_ids(12)
    want = prefill(model, ids, model.make_cache())
    want_rows = model.model.embed_tokens(mx.array(ids))
    assert backends.prepare(model, "cpu").backend == "cpu"
    quantized = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert quantized and all(m.scales.dtype == m.biases.dtype == mx.float16 for m in quantized)
    assert model.model.embed_tokens.scales.dtype == mx.float32  # lookups stay float32 (and reuse's dtype)
    assert mx.array_equal(model.model.embed_tokens(mx.array(ids)), want_rows).item()
    assert mx.abs(prefill(model, ids, model.make_cache()) - want).max().item() < 1e-4
    backends.prepare(model, "mlx")  # MLX's ops would compute in float16: widened back, exactly
    assert all(m.scales.dtype == mx.float32 for m in quantized)
    assert mx.array_equal(prefill(model, ids, model.make_cache()), want).item()
    inexact = _quantized_tiny(f16_exact=False)
    assert cpu_layers.narrow_scales(inexact) == 0
    assert all(m.scales.dtype == mx.float32 for _, m in inexact.named_modules() if isinstance(m, nn.QuantizedLinear))


def test_cache_limit_is_sized_to_the_model():
    from types import SimpleNamespace

    from reuse_helpers import tiny_model

    from mlxgen.runtime import CPU_CHUNK

    assert cpu_backend.cache_limit_for(tiny_model("llama")) == cpu_backend.CPU_CACHE_LIMIT  # the floor
    proj = nn.QuantizedLinear(1024, 8192, bias=False, group_size=32, bits=4)
    args = SimpleNamespace(hidden_size=1024, intermediate_size=8192, moe_intermediate_size=0, vocab_size=5)
    big = SimpleNamespace(args=args, named_modules=lambda: [("mlp.up_proj", proj)])
    want = 2 * (CPU_CHUNK * (6 * 1024 + 3 * 8192) * 4 + 8192 * 1024 * 4)
    assert cpu_backend.cache_limit_for(big) == want


def _step_ops(model, cache, token: int, path) -> collections.Counter:
    # One decode step's graph, counted by primitive.
    logits = model(mx.array([[token]]), cache)
    mx.export_to_dot(str(path), logits)
    mx.eval(logits)
    return collections.Counter(re.findall(r'label ="([^"]*)"', path.read_text()))


@kernels
@pytest.mark.parametrize("arch", ["smollm2", "qwen3"])
def test_decode_steps_are_lean_and_match_the_full_forward(ext, arch, tmp_path, monkeypatch):
    # A decode step (one position: heads reshaped, not transposed; kernel inputs made dense at
    # eval, not by Contiguous nodes) gives the logits of the whole sequence's forward pass.
    from reuse_helpers import max_diff, tiny_model, token_ids

    monkeypatch.setenv("MLXGEN_KV_DTYPE", "float32")  # as the forward pass keeps K/V

    from mlxgen.prefill import prefill

    model, ids = tiny_model(arch), token_ids(12)
    for backend in ("mlx", "cpu"):
        backends.prepare(model, backend)
        want = model(mx.array([ids]))
        cache = model.make_cache()
        assert max_diff(prefill(model, ids[:8], cache), want[:, 7]) < 1e-4
        for i in range(8, 12):
            assert max_diff(model(mx.array([[ids[i]]]), cache)[:, -1], want[:, i]) < 1e-4, (backend, i)
    # On MLX's own ops (backend "mlx") nn.Linear's weight.T is a transpose node of its own.
    ops = _step_ops(model, cache, ids[0], tmp_path / "step.dot")
    assert "Transpose" not in ops and "Contiguous" not in ops, ops
    assert ops["MlxgenDecodeAttention"] == len(model.layers), ops


def _bias_adds(path) -> int:
    # Add nodes whose inputs are a qmatvec's output and a Broadcast's (a projection's bias added
    # after the kernel), in a step graph exported by _step_ops.
    text = path.read_text()
    label = dict(re.findall(r'\{ (\d+) \[label ="([^"]*)"', text))
    made_by = {out: label[node] for node, out in re.findall(r'^(\d+) -> "([^"]+)"', text, re.M)}
    inputs = collections.defaultdict(set)
    for arr, node in re.findall(r'^"([^"]+)" -> (\d+)', text, re.M):
        inputs[node].add(made_by.get(arr))
    return sum(label[n] == "Add" and {"MlxgenQuantMatvec", "Broadcast"} <= ins for n, ins in inputs.items())


@kernels
@pytest.mark.parametrize("arch", ["smollm2", "qwen2"])
def test_quantized_decode_steps_are_lean(ext, arch, tmp_path, monkeypatch):
    # The quantized projections (qmatvec) take their inputs as they are too: no Contiguous node
    # per input, Qwen2's q/k/v biases added inside the kernel (no Broadcast + Add per projection),
    # and the step still gives the MLX ops' logits on the same packed weights.
    import mlx.nn as nn
    from reuse_helpers import max_diff, tiny_model, token_ids

    from mlxgen.prefill import prefill

    from mlxgen.models.llama import TransformerBlock

    model, ids = tiny_model(arch), token_ids(10)
    nn.quantize(model, group_size=32, bits=4)
    biased = sum(isinstance(m, nn.QuantizedLinear) and "bias" in m for _, m in model.named_modules())
    assert biased == (3 * len(model.layers) if arch == "qwen2" else 0)
    got = {}
    for backend in ("mlx", "cpu"):
        backends.prepare(model, backend)
        for layer in model.layers:  # the plain layers (a covered layer's step is two C++ ops:
            layer.__class__ = TransformerBlock  # tests/test_cpu_decode_layer.py)
        cache = model.make_cache()
        mx.eval(prefill(model, ids[:8], cache))
        got[backend] = model(mx.array([[ids[8]]]), cache)[:, -1]
    assert max_diff(got["cpu"], got["mlx"]) < 1e-3
    ops = _step_ops(model, cache, ids[9], tmp_path / "step.dot")
    assert ops["MlxgenQuantMatvec"] >= 7 * len(model.layers) and "Contiguous" not in ops, ops
    assert _bias_adds(tmp_path / "step.dot") == 0, ops
    if biased:  # the bias added after the kernel, as before: the check counts every one
        def bias_after(self, x):
            y = cpu_layers._quantized_product(x, self)
            return y + self.bias if "bias" in self else y

        monkeypatch.setattr(cpu_layers.CpuQuantizedLinear, "__call__", bias_after)
        _step_ops(model, cache, ids[9], tmp_path / "after.dot")
        assert _bias_adds(tmp_path / "after.dot") == biased
