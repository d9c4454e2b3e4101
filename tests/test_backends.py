"""The backend seam: prepare() picks and records how a model runs, can be redone, and the Metal
and CUDA policies (wired memory, buffer-cache clearing, bit widths) on simulated devices."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from reuse_helpers import max_diff, tiny_model, token_ids

import mlxgen
from mlxgen import backends
from mlxgen.backends import device
from mlxgen.backends.metal import unavailable_reason
from mlxgen.loading.quantized import dequantize_model
from mlxgen.prefill import prefill
from mlxgen.runtime import Runtime


def test_prepare_records_the_runtime_and_can_be_redone():
    model = tiny_model("qwen3")
    ids = token_ids(30)
    plain = prefill(model, ids, model.make_cache())  # never prepared: MLX's ops
    assert model.runtime == Runtime()
    for name in ("cpu", "mlx", "metal", "cuda", "cpu"):
        runtime = backends.prepare(model, name)
        assert model.runtime is runtime
        assert max_diff(prefill(model, ids, model.make_cache()), plain) < 1e-4, name
    assert type(model.layers[0].mlp.gate_proj).__name__ == "CpuLinear"
    backends.prepare(model, "mlx")
    assert not any(type(m).__module__.startswith("mlxgen.backends") for _, m in model.named_modules())
    assert not any("sdpa" in m.__dict__ or "activation" in m.__dict__ for _, m in model.named_modules())
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.prepare(model, "tpu")


def test_default_backend_is_this_device():
    model = tiny_model("llama")
    assert backends.prepare(model).backend == ("cpu" if device.is_cpu() else "metal")


class FakeMetal:
    """mx's Metal memory calls, recorded."""

    def __init__(self, monkeypatch):
        self.limits = []
        monkeypatch.setattr(mx.metal, "is_available", lambda: True)
        monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 123 << 20})
        monkeypatch.setattr(mx, "set_wired_limit", self.set_wired_limit)
        self.current = 0

    def set_wired_limit(self, n):
        self.limits.append(n)
        previous, self.current = self.current, n
        return previous


def test_metal_wires_memory_while_generating_and_restores_it(monkeypatch):
    model = tiny_model("llama")
    backends.prepare(model, "metal")  # on this CPU: no kernels, Metal's memory policy
    tokenizer = _ids_tokenizer()
    fake = FakeMetal(monkeypatch)
    out = list(mlxgen.stream_generate(model, tokenizer, token_ids(12), max_tokens=3))
    assert len(out) == 3
    assert fake.limits == [123 << 20, 0]  # wired for the generation, then the old limit back
    backends.prepare(model, "cpu")
    fake.limits.clear()
    list(mlxgen.stream_generate(model, tokenizer, token_ids(12), max_tokens=2))
    assert fake.limits == []


def test_metal_clears_the_buffer_cache_between_prefill_chunks(monkeypatch):
    model = tiny_model("llama")
    cleared = []
    monkeypatch.setattr(mx, "clear_cache", lambda: cleared.append(1))
    backends.prepare(model, "metal")
    prefill(model, token_ids(100), model.make_cache(), chunk_size=32)
    assert len(cleared) == 3  # after each of the 3 chunks before the last
    backends.prepare(model, "cpu")  # the CPU keeps its buffers: reuse is what makes it fast
    cleared.clear()
    prefill(model, token_ids(100), model.make_cache(), chunk_size=32)
    assert cleared == []


def test_cuda_dequantizes_only_the_bit_widths_it_lacks(monkeypatch):
    model = tiny_model("llama")
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear) and "mlp" in p)
    nn.quantize(model, group_size=32, bits=3, class_predicate=lambda p, m: isinstance(m, nn.Linear) and "self_attn" in p)
    monkeypatch.setattr(device, "backend_name", lambda: "cuda")
    real = mx.quantized_matmul

    def cuda_qmm(x, w, scales, biases, transpose=True, group_size=64, bits=4, **kw):
        if bits == 3:
            raise RuntimeError("[quantized_matmul] 3 bits not supported on CUDA (simulated)")
        return real(x, w, scales, biases, transpose, group_size, bits, **kw)

    monkeypatch.setattr(mx, "quantized_matmul", cuda_qmm)
    device.supported_bits.cache_clear()
    try:
        n = dequantize_model(model, mx.float32, lambda m: not device.supported_bits(m.bits, m.group_size))
    finally:
        device.supported_bits.cache_clear()
    layer = model.layers[0]
    assert n == 4 * len(model.layers)  # q, k, v, o
    assert type(layer.self_attn.q_proj) is nn.Linear and type(layer.mlp.up_proj) is nn.QuantizedLinear


def test_metal_kernels_are_refused_on_cuda_with_the_reason(monkeypatch):
    class Cuda:
        @staticmethod
        def is_available():
            return True

    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx, "cuda", Cuda, raising=False)
    assert "CUDA" in unavailable_reason() and "Metal" in unavailable_reason()


def _ids_tokenizer():
    from test_generate import tiny_tokenizer

    return mlxgen.Tokenizer(tiny_tokenizer(vocab_size=300), eos_token_ids=[])
