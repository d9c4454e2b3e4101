"""The CPU decode step as two C++ ops per layer (mlxgen/backends/cpu/decode.py): the plain layers'
logits on the same packed weights for every architecture it covers, MLX's own layers for the rest."""

import collections
import re

import mlx.core as mx
import mlx.nn as nn
import pytest
from build_tools import needs_cpu_kernel_tools
from reuse_helpers import max_diff, tiny_model, token_ids

from mlxgen import backends
from mlxgen.backends.cpu import decode
from mlxgen.cache import KVCache
from mlxgen.models.llama import TransformerBlock
from mlxgen.prefill import prefill

pytestmark = needs_cpu_kernel_tools


def _quantized(arch: str, bits: dict | None = None, **overrides):
    # Projections at `bits` by name (q_proj, v_proj, down_proj...), 4 bits otherwise.
    model = tiny_model(arch, **overrides)
    bits = bits or {}

    def pick(path, module):
        if not isinstance(module, nn.Linear):
            return isinstance(module, nn.Embedding)
        name = path.rsplit(".", 1)[-1]
        wide = name == "gate_proj" and module.weight.shape[1] % 64 == 0
        return {"bits": bits.get(name, 4), "group_size": 64 if wide else 32}

    nn.quantize(model, group_size=32, bits=4, class_predicate=pick)
    return model


def _decode(model, ids: list[int], fused: bool, steps: int, mode: str | None = None) -> list[mx.array]:
    for layer in model.layers:
        if isinstance(layer, TransformerBlock):
            layer.__class__ = decode.CpuTransformerBlock if fused else TransformerBlock
    cache = model.make_cache(mode)
    mx.eval(prefill(model, ids[:-steps], cache))
    return [model(mx.array([[t]]), cache)[:, -1] for t in ids[-steps:]]


def _step_ops(model, ids: list[int], path) -> collections.Counter:
    cache = model.make_cache()
    mx.eval(prefill(model, ids[:-1], cache))
    logits = model(mx.array([ids[-1:]]), cache)
    mx.export_to_dot(str(path), logits)
    return collections.Counter(re.findall(r'label ="([^"]*)"', path.read_text()))


@pytest.mark.parametrize("arch,bits", [
    ("smollm2", {}),                                            # GQA 3:1, tied head
    ("qwen2", {"q_proj": 5, "k_proj": 5, "v_proj": 8, "down_proj": 6}),  # q/k/v biases, Q4_K_M-like mix
    ("qwen3", {"o_proj": 3, "up_proj": 2}),                     # q/k RMSNorm, head_dim != hidden / heads
    ("llama3-rope", {}),                                        # scaled RoPE frequencies
    ("linear-rope", {}),                                        # RoPE position scale
    ("phi3", {}),
])
def test_fused_decode_gives_the_plain_layers_logits(ext, arch, bits, monkeypatch):
    monkeypatch.setenv("MLXGEN_KV_DTYPE", "float32")  # MLX's ops below keep the model's float32
    model = _quantized(arch, bits)
    assert backends.prepare(model, "cpu").backend == "cpu"
    assert all(type(layer) is decode.CpuTransformerBlock and decode.plan(layer) for layer in model.layers)
    monkeypatch.setattr(KVCache, "step", 4)  # decode steps cross buffer reallocations
    ids = token_ids(14)
    plain, fused = _decode(model, ids, False, 6), _decode(model, ids, True, 6)
    for i, (a, b) in enumerate(zip(plain, fused)):
        assert max_diff(b, a) < 1e-5, (arch, i)
    backends.prepare(model, "mlx")  # and MLX's own quantized ops, within their rounding
    for a, b in zip(_decode(model, ids, False, 6), fused):
        assert max_diff(b, a) < 1e-3


def test_a_batch_of_two_sequences(ext):
    model = _quantized("qwen2")
    backends.prepare(model, "cpu")
    ids = mx.array([token_ids(12, seed=1), token_ids(12, seed=2)])
    out = {}
    for cls in (TransformerBlock, decode.CpuTransformerBlock):
        for layer in model.layers:
            layer.__class__ = cls
        cache = model.make_cache()
        model(ids[:, :8], cache)
        out[cls] = [model(ids[:, i : i + 1], cache)[:, -1] for i in range(8, 12)]
    assert all(max_diff(b, a) < 1e-5 for a, b in zip(*out.values()))


@pytest.mark.parametrize("arch", ["smollm2", "qwen2"])
def test_a_float16_cache_by_default_on_the_cpu(ext, arch, monkeypatch):
    # float16 keys and values (as Ollama's cache): the plain and fused steps agree exactly, and
    # both stay within float16 rounding of a float32 cache.
    monkeypatch.delenv("MLXGEN_KV_DTYPE", raising=False)  # the default (the suite sets float32)
    model = _quantized(arch)
    assert backends.prepare(model, "cpu").kv_dtype == "float16"
    ids = token_ids(14)
    plain, fused = _decode(model, ids, False, 6), _decode(model, ids, True, 6)
    assert model.make_cache()[0].dtype == mx.float16
    assert all(max_diff(b, a) < 1e-5 for a, b in zip(plain, fused))
    monkeypatch.setenv("MLXGEN_KV_DTYPE", "float32")
    assert backends.prepare(model, "cpu").kv_dtype == "float32"
    wide = _decode(model, ids, True, 6)
    diffs = [max_diff(b, a) for a, b in zip(wide, fused)]
    assert 0 < max(diffs) < 5e-3, diffs


def test_a_fused_step_is_four_nodes_per_layer(ext, tmp_path):
    model = _quantized("qwen2")
    backends.prepare(model, "cpu")
    ops = _step_ops(model, token_ids(10), tmp_path / "step.dot")
    n = len(model.layers)
    assert ops["MlxgenDecodeQKV"] == ops["MlxgenDecodeOut"] == n, ops
    assert ops["SliceUpdate"] == 2 * n, ops  # the cache's in-place writes
    assert ops["MlxgenQuantMatvec"] == 1 and ops["MlxgenRmsNorm"] == 1, ops  # the tied head, final norm
    assert not {"MlxgenRope", "RoPE", "MlxgenDecodeAttention", "MlxgenSiluMul", "Slice"} & set(ops), ops
    assert "Add" not in ops and ops["MlxgenDequantize"] == 1, ops  # the embedding lookup: one kernel
    embed, ids = model.model.embed_tokens, mx.array([[3, 250, 3], [0, 7, 9]])
    assert mx.array_equal(embed(ids), nn.QuantizedEmbedding.__call__(embed, ids)).item()


@pytest.mark.parametrize("arch,overrides,mode", [
    ("mistral", {"sliding_window": 5}, None),   # a window: masks the kernel does not apply
    ("llama", {}, "pre-rope"),                 # keys rotated when attended
    ("qwen3_moe", {}, None),                    # experts in the sparse layers
    ("gemma2", {}, None),                       # its own block
])
def test_layers_the_ops_do_not_cover_run_as_before(ext, arch, overrides, mode, tmp_path):
    model = _quantized(arch, **overrides)
    backends.prepare(model, "cpu")
    ids = token_ids(14)
    plain, fused = _decode(model, ids, False, 5, mode), _decode(model, ids, True, 5, mode)
    assert all(max_diff(b, a) < 1e-6 for a, b in zip(plain, fused))
    if mode is None:
        covered = sum(decode.plan(layer) is not None for layer in model.layers
                      if isinstance(layer, TransformerBlock))
        ops = _step_ops(model, ids, tmp_path / "step.dot")
        assert ops["MlxgenDecodeQKV"] == covered, ops
        assert covered < len(model.layers) or arch == "mistral", covered


def test_float_weights_keep_the_plain_layers(ext):
    model = tiny_model("smollm2")
    backends.prepare(model, "cpu")
    assert all(decode.plan(layer) is None for layer in model.layers)


def test_layers_decide_again_after_prepare(ext, tmp_path):
    model, ids = tiny_model("smollm2"), token_ids(6)
    backends.prepare(model, "cpu")
    mx.eval(prefill(model, ids, model.make_cache()))  # each layer decides on its first call
    assert all(layer.__dict__["_decode_plan"] is None for layer in model.layers)  # float weights
    backends.prepare(model, "mlx")
    nn.quantize(model, group_size=32, bits=4)
    backends.prepare(model, "cpu")
    assert _step_ops(model, ids, tmp_path / "step.dot")["MlxgenDecodeQKV"] == len(model.layers)


def test_bad_arrays_are_refused_before_any_work(ext):
    model = _quantized("smollm2")
    attn = model.layers[0].self_attn
    x = mx.zeros((1, 1, 96))
    arrays = [x, model.layers[0].input_layernorm.weight]
    for p in (attn.q_proj, attn.k_proj, attn.v_proj):
        arrays += [p.weight, p.scales, p.biases]
    arrays.append(attn.rope.inverse_frequencies())
    args = ([4, 4, 4], [32, 32, 32], 3, 1, 32, 1e-5, 0, 1.0, False, 1.0, False, False, mx.float32, 1)
    q, k, v = ext.decode_qkv(arrays, *args)
    assert q.shape == (1, 3, 1, 32) and k.shape == v.shape == (1, 1, 1, 32)
    with pytest.raises(ValueError, match="k_proj: w must be uint32"):
        ext.decode_qkv(arrays[:5] + arrays[2:5] + arrays[8:], *args)  # q's weight where k's goes
    with pytest.raises(ValueError, match="takes x, norm"):
        ext.decode_qkv(arrays[:-1], *args)
    with pytest.raises(ValueError, match="float32 or float16"):
        ext.decode_qkv(arrays, *args[:-2], mx.bfloat16, 1)
    with pytest.raises(ValueError, match="n must be between 1"):
        buf = mx.zeros((1, 1, 8, 32))
        ext.decode_out([x, q, buf, buf] + [mx.zeros((1,))] * 13, [4] * 4, [32] * 4, 9, 1.0, 1e-5, 1)
