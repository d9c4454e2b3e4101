"""GGUF K-quants repacked into MLX's affine layout (mlxgen/loading/gguf_quants.py): every type
against the gguf package's dequantized values, within the bound bench/NOTES.md states; models
built from them; and damaged files refused before any tensor is read."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import Q4_K, dequantize

sys.path.insert(0, str(Path(__file__).parent))
from gguf_fixtures import (  # noqa: E402
    MIXED_TYPES, QWEN_GGUF, SMOLLM2_GGUF, random_blocks, write_synthetic,
)

import mlxgen.loading.gguf as gguf_loader  # noqa: E402
from mlxgen.errors import ModelLoadError  # noqa: E402
from mlxgen.loading import build_model  # noqa: E402
from mlxgen.loading.gguf import quantized_bits, read_gguf, read_gguf_header  # noqa: E402
from mlxgen.loading.gguf_quants import K_BITS, pack, repack_k  # noqa: E402

FP16_EPS = 2.0**-11  # unit roundoff of fp16: |fp16(x) - x| <= FP16_EPS * |x| (normal range)
FP16_SUBNORMAL = 2.0**-25  # absolute rounding of tiny (subnormal) fp16 scales, down to 0


def mlx_values(packed, scales, biases, bits: int) -> np.ndarray:
    """What MLX computes from a triplet: scale * q + bias per group of 32, in float32."""
    f32 = lambda a: mx.array(a).astype(mx.float32)
    return np.array(mx.dequantize(mx.array(packed), f32(scales), f32(biases), group_size=32,
                                  bits=bits))


def _q6k_clash(raw: np.ndarray) -> np.ndarray:
    """(blocks, 8): groups of 32 whose two sub-block scales are equal and opposite (not 0)."""
    sc = raw.reshape(-1, 210)[:, 192:208].copy().view(np.int8).astype(np.int16)
    return (sc[:, 0::2] == -sc[:, 1::2]) & (sc[:, 0::2] != 0)


def per_element(a: np.ndarray) -> np.ndarray:
    return np.repeat(np.abs(a.astype(np.float32)), 32, axis=-1)


def k_error_bound(raw: np.ndarray, qtype: QT, scales: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """Per-element bound on |repacked - gguf| for each type (the table in bench/NOTES.md)."""
    return _relative_bound(raw, qtype, scales, biases) + 2 ** K_BITS[qtype] * FP16_SUBNORMAL


def _relative_bound(raw, qtype, scales, biases):
    s, b = per_element(scales), per_element(biases)
    if qtype in (QT.Q4_K, QT.Q5_K):  # exact codes; only d*sc and dmin*m round to fp16
        blocks = raw.reshape(-1, 144 if qtype == QT.Q4_K else 176)
        sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        exact_s = np.repeat(d * sc, 32, axis=-1).reshape(s.shape)
        exact_b = np.repeat(dmin * m, 32, axis=-1).reshape(s.shape)
        qmax = 2 ** K_BITS[qtype] - 1
        return FP16_EPS * (qmax * exact_s + exact_b) * 1.001
    if qtype == QT.Q6_K:  # half a lattice step, plus 128 codes times the fp16 rounding of it;
        # groups with equal and opposite scales also round their bias (-127.5 steps)
        clash = np.repeat(_q6k_clash(raw), 32, axis=-1).reshape(s.shape)
        return s * (0.5 + np.where(clash, 256, 128) * FP16_EPS) * 1.001
    # min/max requantization: half a step, plus fp16 rounding of bias and of (2^b - 1) steps
    return (s * (0.5 + (2 ** K_BITS[qtype] - 1) * FP16_EPS) + b * FP16_EPS) * 1.001


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_matches_mlx_bit_order(bits):
    q = np.random.default_rng(bits).integers(0, 2**bits, (3, 96), dtype=np.uint8)
    got = mlx_values(pack(q, bits), np.ones((3, 3)), np.zeros((3, 3)), bits)
    np.testing.assert_array_equal(got, q)
    q2, s, b = mx.quantize(mx.array(q.astype(np.float32)), group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(q2), pack(np.array(mx.dequantize(
        q2, mx.ones(s.shape), mx.zeros(s.shape), group_size=32, bits=bits)).astype(np.uint8), bits))


@pytest.mark.parametrize("qtype", list(K_BITS))
@pytest.mark.parametrize("rows, blocks", [(1, 1), (7, 3), (33, 2)])
def test_repacked_k_quant_within_bound(qtype, rows, blocks):
    rng = np.random.default_rng(rows * 10 + blocks)
    raw = random_blocks((rows, 256 * blocks), qtype, rng)
    expected = dequantize(raw, qtype)
    packed, scales, biases = repack_k(raw, qtype)
    assert scales.dtype == biases.dtype == np.float16 and packed.dtype == np.uint32
    assert packed.shape == (rows, 256 * blocks * K_BITS[qtype] // 32)
    got = mlx_values(packed, scales, biases, K_BITS[qtype])
    err = np.abs(got - expected)
    bound = k_error_bound(raw, qtype, scales, biases)
    assert (err <= bound).all(), (qtype.name, float((err / bound).max()))


def test_q6_k_larger_scale_half_is_exact():
    raw = random_blocks((5, 512), QT.Q6_K, np.random.default_rng(1))
    packed, scales, biases = repack_k(raw, QT.Q6_K)
    err = np.abs(mlx_values(packed, scales, biases, 8) - dequantize(raw, QT.Q6_K))
    sc = raw.reshape(-1, 210)[:, 192:208].copy().view(np.int8).astype(np.int16).reshape(5, -1, 2)
    second = (np.abs(sc[..., 1]) > np.abs(sc[..., 0]))[..., None]  # (rows, groups, 1)
    big_half = np.where(second, np.arange(32) >= 16, np.arange(32) < 16)  # larger-scale half
    big_half &= ~_q6k_clash(raw).reshape(5, -1, 1)  # equal |scales|: both halves rounded
    step = per_element(scales).reshape(5, -1, 32)
    assert (err.reshape(5, -1, 32)[big_half] <= (128 * FP16_EPS * step * 1.001)[big_half]).all()
    assert err.max() > 0  # the other half is rounded: the test would notice a no-op


def test_q6_k_equal_and_opposite_scales_fit_8_bits():
    raw = random_blocks((4, 512), QT.Q6_K, np.random.default_rng(4)).reshape(-1, 210)
    raw[:, 192:208] = np.tile(np.array([50, -50, -128, 127, 7, -7, 0, 0], np.int8), 2).view(np.uint8)
    raw[:, [0, 16]] &= 0xF0  # elements 0 and 16 (one per half of group 0): q = 0, i.e. -32,
    raw[:, [128, 144]] &= 0xFC  # the extreme codes -128 and +128 that 8 bits cannot both hold
    raw = raw.reshape(4, -1)
    packed, scales, biases = repack_k(raw, QT.Q6_K)
    err = np.abs(mlx_values(packed, scales, biases, 8) - dequantize(raw, QT.Q6_K))
    step = per_element(scales)
    assert (err <= step * (0.5 + 256 * FP16_EPS) + 2**8 * FP16_SUBNORMAL).all()
    clash = np.tile([True, False, True, False], 4 * 2 * 2)  # groups (50, -50) and (7, -7)
    assert (np.abs(scales.reshape(-1)[clash]) > 0).all()


def test_chunked_rows_match_unchunked(monkeypatch):
    raw = random_blocks((40, 512), QT.Q5_K, np.random.default_rng(2))
    whole = repack_k(raw, QT.Q5_K)
    monkeypatch.setattr("mlxgen.loading.gguf_quants._CHUNK_ELEMENTS", 3 * 512)  # 3 rows a chunk
    for a, b in zip(whole, repack_k(raw, QT.Q5_K)):
        np.testing.assert_array_equal(a, b)


def test_fp16_overflow_returns_none():
    raw = random_blocks((2, 256), QT.Q4_K, np.random.default_rng(3), d=(6e4, 6.5e4))
    assert repack_k(raw, QT.Q4_K) is None


@pytest.mark.parametrize("tied", [False, True])
def test_synthetic_model_with_every_k_type_keeps_them_and_runs(tmp_path, tied):
    types = {"attn_q": QT.Q4_K, "attn_k": QT.Q5_K, "attn_v": QT.Q6_K, "attn_output": QT.Q3_K,
             "ffn_gate": QT.Q2_K, "ffn_up": QT.Q4_K, "ffn_down": QT.Q6_K, "token_embd": QT.Q6_K}
    syn = write_synthetic(tmp_path / "k.gguf", "llama", hidden=256, heads=4, kv_heads=2, ff=256,
                          types=types, tied=tied)  # tied: the 8-bit embedding is the head too
    c = read_gguf(syn.path)
    assert c.metadata["dequantized"] == {}
    assert c.metadata["approximated"] == {"Q6_K": 5, "Q3_K": 2, "Q2_K": 2}
    for name, qtype in syn.qtypes.items():
        module = name.rpartition(".")[0]
        if quantized_bits(qtype) is None or syn.original[name].ndim < 2:
            continue
        assert c.quantization[module] == {"group_size": 32, "bits": quantized_bits(qtype)}, name
        w, s, b = (c.weights[f"{module}.{k}"] for k in ("weight", "scales", "biases"))
        got = mlx_values(w, s, b, quantized_bits(qtype))
        s, b = (per_element(np.array(a.astype(mx.float32))) for a in (s, b))
        tol = s * 1.07 + b * 2 * FP16_EPS + 1e-6  # the loosest of the per-type bounds
        assert (np.abs(got - syn.expected[name]) <= tol).all(), name  # q/k rows unpermuted too
    # mixed bits (4, 5, 8) build; MLX's quantized matmul on them equals the same weights in float32
    keep = build_model(c.config, c.weights, c.quantization, quantized="keep")
    deq = build_model(c.config, c.weights, c.quantization, quantized="dequantize")
    tokens = mx.array([[1, 5, 9, 2, 7]])
    a, b = keep(tokens), deq(tokens)
    # random blocks make large weights, so rounding differences between the two paths (and the CPU
    # path's fast exp) grow through the layers; a wrong layout or bit width would differ by O(1)
    assert mx.abs(a - b).max().item() <= 1e-2 * mx.abs(b).max().item()
    ref = read_gguf(syn.path, k_quants=False)  # the float32 reference keeps gguf's values
    assert ref.metadata["dequantized"] == {"Q4_K": 4, "Q5_K": 2, "Q6_K": 5, "Q3_K": 2, "Q2_K": 2}


def test_unkept_types_are_logged_once(tmp_path, caplog):
    syn = write_synthetic(tmp_path / "iq.gguf", types={"ffn_up": QT.TQ1_0, "ffn_gate": QT.TQ1_0},
                          hidden=256, ff=256)
    with caplog.at_level("WARNING", logger="mlxgen.loading.gguf"):
        c = read_gguf(syn.path)
    assert c.metadata["dequantized"] == {"TQ1_0": 4}
    messages = [r.getMessage() for r in caplog.records if "no MLX quantized form" in r.getMessage()]
    assert messages == ["iq.gguf: TQ1_0 tensors have no MLX quantized form and are kept as float32"]


# --- damaged files: refused from the header, before any tensor is read --------------------------
@pytest.fixture
def no_tensor_reads(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(gguf_loader, "_tensor_arrays", fail)
    monkeypatch.setattr(gguf_loader, "repack_k", fail)


def _patch_tensor_info(path: Path, name: str, *, qtype: int | None = None, ne0: int | None = None):
    """Rewrite one tensor's type id or first dimension in place (a mislabeled file)."""
    data = bytearray(path.read_bytes())
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, at)[0]
    if ne0 is not None:
        struct.pack_into("<Q", data, at + 4, ne0)
    if qtype is not None:
        struct.pack_into("<I", data, at + 4 + 8 * n_dims, qtype)
    path.write_bytes(bytes(data))


def test_mislabeled_type_is_refused_before_reading(tmp_path, no_tensor_reads):
    types = {**MIXED_TYPES, "ffn_down": QT.Q4_K}
    syn = write_synthetic(tmp_path / "m.gguf", hidden=256, ff=256, types=types)
    _patch_tensor_info(syn.path, "blk.1.ffn_down.weight", qtype=int(QT.F32))  # 7x the bytes
    with pytest.raises(ModelLoadError, match="truncated"):
        read_gguf(syn.path)


def test_huge_claimed_shape_is_refused_before_any_allocation(tmp_path, no_tensor_reads):
    syn = write_synthetic(tmp_path / "h.gguf", hidden=256, ff=256, types={"ffn_up": QT.Q4_K})
    _patch_tensor_info(syn.path, "blk.0.ffn_up.weight", ne0=256 << 30)  # a terabyte-sized tensor
    with pytest.raises(ModelLoadError, match="truncated|corrupt shape"):
        read_gguf(syn.path)


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_k_quant_file(tmp_path, cut, no_tensor_reads):
    syn = write_synthetic(tmp_path / "t.gguf", hidden=256, ff=256, types={"ffn_up": QT.Q6_K})
    data = syn.path.read_bytes()
    syn.path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ModelLoadError, match="truncated"):
        read_gguf(syn.path)


# --- the real Qwen2.5-Coder Q4_K_M file ---------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not QWEN_GGUF.is_file(), reason=f"{QWEN_GGUF} missing")
def test_real_qwen_k_tensors_within_bound():
    header = read_gguf_header(QWEN_GGUF)
    seen = set()
    for t in header.tensors:
        if t.qtype not in K_BITS:
            continue
        seen.add(t.qtype)
        raw = np.frombuffer(header.buffer, np.uint8, t.nbytes, t.offset).reshape(t.shape[0], -1)
        packed, scales, biases = repack_k(raw, t.qtype)
        err = np.abs(mlx_values(packed, scales, biases, K_BITS[t.qtype]) - dequantize(raw, t.qtype))
        assert (err <= k_error_bound(raw, t.qtype, scales, biases)).all(), t.name
    assert seen == {QT.Q4_K, QT.Q6_K}


PROMPTS = ["Write a Python function that returns the factorial of n.",
           "What is the capital of France?", "def fibonacci(n):"]


@pytest.mark.slow
@pytest.mark.parametrize("path", [QWEN_GGUF, SMOLLM2_GGUF], ids=["qwen", "smollm2"])
def test_real_keep_and_dequantize_agree_on_greedy_tokens(path):
    """quantized="keep" (MLX's quantized matmul on the repacked tensors) vs the float32 path."""
    import mlxgen
    from mlxgen.generate import stream_generate

    if not path.is_file():
        pytest.skip(f"{path} missing")
    tokens = {}
    for mode in ("keep", "dequantize"):
        model, tok = mlxgen.load(path, quantized=mode)
        assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()) == (
            mode == "keep")
        tokens[mode] = [[r.token for r in stream_generate(model, tok, p, max_tokens=16,
                                                          temperature=0.0)] for p in PROMPTS]
        del model
    assert tokens["keep"] == tokens["dequantize"]


def test_checkpoint_float_dtype():
    from mlxgen.loading.dtypes import checkpoint_float_dtype

    norm = mx.ones((64,), mx.float32)
    assert checkpoint_float_dtype({"a.weight": mx.zeros((64, 64), mx.bfloat16), "n.weight": norm,
                                   "e.weight": mx.zeros((8, 64), mx.float32)}) == mx.bfloat16
    f16 = mx.zeros((64, 2), mx.float16)
    quantized = {"q.weight": mx.zeros((64, 8), mx.uint32), "q.scales": f16, "q.biases": f16,
                 "e.weight": mx.zeros((64, 32), mx.float32)}
    assert checkpoint_float_dtype(quantized) == mx.float16  # 4096 quantized vs 2048 float32
    assert checkpoint_float_dtype({"n.weight": norm}) is None


@pytest.mark.slow
@pytest.mark.skipif(not QWEN_GGUF.is_file(), reason=f"{QWEN_GGUF} missing")
def test_real_qwen_checkpoint_dtype():
    from mlxgen.loading.dtypes import checkpoint_float_dtype

    assert checkpoint_float_dtype(read_gguf(QWEN_GGUF).weights) == mx.float16


@pytest.mark.parametrize("quantized", ["keep", "dequantize"])
def test_lazy_build_matches_eager(tmp_path, quantized):
    syn = write_synthetic(tmp_path / "z.gguf", hidden=256, ff=256, types={"ffn_up": QT.Q4_K})
    c = read_gguf(syn.path)
    tokens = mx.array([[3, 1, 4, 1, 5]])
    eager = build_model(c.config, c.weights, c.quantization, quantized=quantized)(tokens)
    lazy = build_model(c.config, c.weights, c.quantization, quantized=quantized, lazy=True)
    np.testing.assert_array_equal(np.array(lazy(tokens)), np.array(eager))


def test_k_quant_expert_stacks_keep_their_leading_dimension(tmp_path):
    types = {"ffn_up_exps": QT.Q4_K, "ffn_gate_exps": QT.Q6_K, "ffn_down_exps": QT.Q5_K}
    syn = write_synthetic(tmp_path / "moe.gguf", "qwen3moe", hidden=256, experts=3, moe_ff=256,
                          types=types, qk_norm=True)
    c = read_gguf(syn.path)
    for proj, bits in (("up_proj", 4), ("gate_proj", 8), ("down_proj", 5)):
        module = f"model.layers.1.mlp.experts.{proj}"
        w, s, b = (c.weights[f"{module}.{k}"] for k in ("weight", "scales", "biases"))
        assert w.shape == (3, 256, 256 * bits // 32) and s.shape == b.shape == (3, 256, 8)
        assert c.quantization[module] == {"group_size": 32, "bits": bits}
        got = mlx_values(w, s, b, bits)
        tol = per_element(np.array(s.astype(mx.float32))) * 1.07 + 2 * FP16_EPS * per_element(
            np.array(b.astype(mx.float32))) + 1e-6
        assert (np.abs(got - syn.expected[f"{module}.weight"]) <= tol).all(), proj
    model = build_model(c.config, c.weights, c.quantization, quantized="keep")
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, c.config["vocab_size"])
