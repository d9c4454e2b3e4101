"""GGUF loading: synthetic files written with gguf.GGUFWriter, the two real files, and errors."""

from __future__ import annotations

import os
import sys
import unicodedata
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

sys.path.insert(0, str(Path(__file__).parent))
from gguf_fixtures import (  # noqa: E402
    GOLDEN_IDS, HF_NAMES, MIXED_TYPES, QWEN_GGUF, SMOLLM2_GGUF, TOKENIZER_CASES, gguf_row_order, tiny_vocab,
    write_synthetic,
)

from mlxgen.errors import ModelLoadError, UnsupportedModelError  # noqa: E402
from mlxgen.loading.gguf import (  # noqa: E402
    NATIVE_BITS, quantized_bits, read_gguf, read_gguf_header,
)
from mlxgen.loading.gguf_tokenizer import tokenizer_from_gguf  # noqa: E402


def as_float32(weights: dict, module: str, bits: int, rows: int | None = None) -> np.ndarray:
    """Dequantize an MLX triplet in float32 (scale * q + bias), exactly as GGML defines it."""
    w, s, b = (weights[f"{module}.{k}"][:rows] for k in ("weight", "scales", "biases"))
    q = np.array(mx.dequantize(w, mx.ones(s.shape), mx.zeros(s.shape), group_size=32, bits=bits))
    s, b = (np.repeat(np.array(a.astype(mx.float32)), 32, axis=-1) for a in (s, b))
    return s * q + b


def check_weights(contents, syn, native: bool = True) -> None:
    is_native = lambda n: native and syn.qtypes[n] in NATIVE_BITS and syn.original[n].ndim > 1
    assert set(contents.weights) == {
        f"{n.rpartition('.')[0]}.{k}" if is_native(n) else n
        for n in syn.expected for k in ("weight", "scales", "biases")
    }
    for name, expected in syn.expected.items():
        module, qtype = name.rpartition(".")[0], syn.qtypes[name]
        if is_native(name):
            assert contents.quantization[module] == {"group_size": 32, "bits": NATIVE_BITS[qtype]}
            got = as_float32(contents.weights, module, NATIVE_BITS[qtype])
        else:
            assert contents.quantization is None or name.endswith(".bias") or (
                module not in contents.quantization)
            got = np.array(contents.weights[name].astype(mx.float32))
        assert got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
        # and the file really holds the original weights (catches layout mistakes in the fixture)
        tol = {QT.Q8_0: 0.02, QT.F16: 2e-3, QT.F32: 0}.get(qtype, 0.25)
        if qtype != QT.Q6_K:
            np.testing.assert_allclose(got, syn.original[name], atol=tol, err_msg=name)


def test_llama_mixed_types_tied_and_qk_unpermuted(tmp_path):
    syn = write_synthetic(tmp_path / "l.gguf", "llama", qkv_bias=True, rope_freqs=[1.0, 2.0, 4.0])
    c = read_gguf(syn.path)
    check_weights(c, syn)
    assert c.config["model_type"] == "llama" and c.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in c.weights and "rope_freqs.weight" not in c.weights
    assert c.config["rope_freq_factors"] == [1.0, 2.0, 4.0]
    assert (c.config["num_attention_heads"], c.config["num_key_value_heads"]) == (4, 2)
    assert c.config["head_dim"] == 16 and c.config["rms_norm_eps"] == 1e-6
    assert c.config["rope_theta"] == 50000.0 and c.config["max_position_embeddings"] == 256
    assert c.quantization["group_size"] == 32 and c.quantization["bits"] in (4, 5, 8)
    # The stored (permuted) rows differ from HF order, so a missing un-permute cannot pass.
    q = syn.expected["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(q, q[gguf_row_order(q.shape[0], 4)])
    assert c.metadata["architecture"] == "llama" and c.metadata["tensor_types"]["Q4_0"] == 2


def test_unpermuted_qk_with_halves_rope_equals_gguf_layout_with_interleaved_rope(tmp_path):
    syn = write_synthetic(tmp_path / "r.gguf", "llama", types={"attn_q": QT.F32, "attn_k": QT.F32})
    c = read_gguf(syn.path)
    x = mx.random.normal((1, 5, 64), key=mx.random.key(1))

    def scores(wq, wk, traditional):
        q = (x @ mx.array(wq).T).reshape(1, 5, 4, 16).transpose(0, 2, 1, 3)
        k = (x @ mx.array(wk).T).reshape(1, 5, 2, 16).transpose(0, 2, 1, 3)
        q = mx.fast.rope(q, 16, traditional=traditional, base=10000.0, scale=1.0, offset=3)
        k = mx.fast.rope(k, 16, traditional=traditional, base=10000.0, scale=1.0, offset=3)
        return q.reshape(1, 2, 2, 5, 16) @ k[:, :, None].swapaxes(-1, -2)

    wq, wk = (syn.original[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qk")
    gguf_layout = scores(wq[gguf_row_order(64, 4)], wk[gguf_row_order(32, 2)], True)
    ours = scores(c.weights["model.layers.0.self_attn.q_proj.weight"],
                  c.weights["model.layers.0.self_attn.k_proj.weight"], False)
    np.testing.assert_allclose(np.array(ours), np.array(gguf_layout), rtol=1e-4, atol=1e-4)


def test_qwen2_biases_untied_not_permuted(tmp_path):
    syn = write_synthetic(tmp_path / "q.gguf", "qwen2", qkv_bias=True, tied=False)
    c = read_gguf(syn.path)
    check_weights(c, syn)
    assert c.config["model_type"] == "qwen2" and c.config["tie_word_embeddings"] is False
    assert "lm_head.weight" in c.weights and "model.layers.1.self_attn.k_proj.bias" in c.weights


def test_qwen3_qk_norm_key_length_and_bf16(tmp_path):
    syn = write_synthetic(tmp_path / "q3.gguf", "qwen3", head_dim=32, qk_norm=True,
                          types={"attn_output": QT.BF16})
    c = read_gguf(syn.path)
    check_weights(c, syn)
    assert c.config["head_dim"] == 32 and c.config["model_type"] == "qwen3"
    assert c.weights["model.layers.0.self_attn.q_norm.weight"].shape == (32,)
    assert c.weights["model.layers.0.self_attn.o_proj.weight"].dtype == mx.bfloat16


def test_qwen3moe_stacked_experts(tmp_path):
    syn = write_synthetic(tmp_path / "moe.gguf", "qwen3moe", experts=4, moe_ff=64, qk_norm=True)
    c = read_gguf(syn.path)
    check_weights(c, syn)
    cfg = c.config
    assert cfg["model_type"] == "qwen3_moe" and cfg["num_experts"] == 4
    assert (cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (2, 64)
    assert cfg["norm_topk_prob"] is True and cfg["decoder_sparse_step"] == 1
    assert cfg["mlp_only_layers"] == []
    assert c.weights["model.layers.0.mlp.experts.down_proj.weight"].shape == (4, 64, 64 * 4 // 32)
    assert c.quantization["model.layers.1.mlp.experts.up_proj"]["bits"] == 8


def test_dequantize_flag_and_k_quants(tmp_path):
    syn = write_synthetic(tmp_path / "d.gguf", "llama", ff=256, types={"ffn_down": QT.Q6_K})
    kept = read_gguf(syn.path)  # K-quants kept (tests/test_gguf_quants.py checks the values)
    assert kept.metadata["dequantized"] == {} and kept.metadata["approximated"] == {"Q6_K": 2}
    assert kept.quantization["model.layers.0.mlp.down_proj"] == {"group_size": 32, "bits": 8}
    c = read_gguf(syn.path, k_quants=False)  # the float32 reference: gguf's values
    check_weights(c, syn)
    assert c.metadata["dequantized"] == {"Q6_K": 2}
    assert "model.layers.0.mlp.down_proj" not in c.quantization
    assert c.weights["model.layers.0.mlp.down_proj.weight"].dtype == mx.float32
    d = read_gguf(syn.path, dequantize=True)
    assert d.quantization is None
    check_weights(d, syn, native=False)


def test_q8_0_with_fp16_overflowing_bias_falls_back_to_dequantized(tmp_path):
    types = {**dict.fromkeys(MIXED_TYPES, QT.F32), "token_embd": QT.Q8_0}
    syn = write_synthetic(tmp_path / "big.gguf", scale=2e4, types=types)  # -128 d > fp16 max
    c = read_gguf(syn.path)
    assert c.quantization is None  # the only quantized tensor could not stay native
    np.testing.assert_array_equal(np.array(c.weights["model.embed_tokens.weight"]),
                                  syn.expected["model.embed_tokens.weight"])


def test_header_metadata_matches_gguf_reader(tmp_path):
    from gguf import GGUFReader

    syn = write_synthetic(tmp_path / "h.gguf", "qwen3moe", experts=4, rope_freqs=[1.0, 2.0])
    header, reader = read_gguf_header(syn.path), GGUFReader(syn.path)
    for key, f in reader.fields.items():
        if not key.startswith("GGUF."):
            ours, theirs = header.metadata[key], f.contents()
            if isinstance(theirs, float):  # we round float32 to its shortest decimal
                ours, theirs = np.float32(ours), np.float32(theirs)
            assert ours == theirs, key
    assert [(t.name, t.shape, t.qtype, t.nbytes, t.offset) for t in header.tensors] == [
        (t.name, tuple(int(n) for n in reversed(t.shape)), t.tensor_type, t.n_bytes,
         t.data_offset) for t in reader.tensors]


def test_linear_rope_scaling(tmp_path):
    meta = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    c = read_gguf(write_synthetic(tmp_path / "s.gguf", extra_meta=meta).path)
    assert c.config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


# --- errors ---------------------------------------------------------------------------------------
def test_error_missing_file_and_bad_magic(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        read_gguf(tmp_path / "nope.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        read_gguf(tmp_path / "bad.gguf")


@pytest.mark.parametrize("keep", [40, 3000, -100])
def test_error_truncated(tmp_path, keep):
    src = write_synthetic(tmp_path / "full.gguf").path
    data = src.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:keep])
    with pytest.raises(ModelLoadError, match="truncated"):
        read_gguf(tmp_path / "cut.gguf")


def test_error_unsupported_arch(tmp_path):
    with pytest.raises(UnsupportedModelError, match="'gemma'.*llama, qwen2, qwen3, qwen3moe"):
        read_gguf(write_synthetic(tmp_path / "g.gguf", "gemma").path)


def test_error_missing_metadata_key(tmp_path):
    syn = write_synthetic(tmp_path / "m.gguf", drop_meta=("llama.block_count",))
    with pytest.raises(ModelLoadError, match="'llama.block_count' is missing"):
        read_gguf(syn.path)


def test_error_unknown_tensor_and_type(tmp_path):
    extra = {"blk.0.attn_qkv.weight": np.zeros((8, 64), np.float32)}
    with pytest.raises(UnsupportedModelError, match="attn_qkv"):
        read_gguf(write_synthetic(tmp_path / "u.gguf", extra_tensors=extra).path)
    syn = write_synthetic(tmp_path / "t.gguf", types={"token_embd": QT.Q8_1})
    with pytest.raises(UnsupportedModelError, match="Q8_1"):
        read_gguf(syn.path, dequantize=True)


# --- tokenizer --------------------------------------------------------------------------------
def test_byte_level_tokenizer_from_synthetic_file(tmp_path):
    parts = read_gguf(write_synthetic(tmp_path / "t.gguf").path).tokenizer
    tokens, _, _ = tiny_vocab()
    ids = parts.tokenizer.encode("<|im_start|>the then", add_special_tokens=False).ids
    assert [tokens[i] for i in ids] == ["<|im_start|>", "t", "he", "\u0120the", "n"]
    assert parts.tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>the then"
    # eos from metadata first, then the other known end-of-turn control token
    assert parts.bos_token_id == len(tokens) - 3
    assert parts.eos_token_ids == [len(tokens) - 1, len(tokens) - 3]
    assert parts.add_bos_token is False and parts.chat_template == "{{ x }}"


def test_unknown_pre_tokenizer_warns_and_unknown_model_raises(caplog):
    tokens, types, merges = tiny_vocab()
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "brand-new",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges}
    assert tokenizer_from_gguf(meta).tokenizer.encode("the").ids == [ord("t"), 257]
    assert "brand-new" in caplog.text
    with pytest.raises(UnsupportedModelError, match="'bert'"):
        tokenizer_from_gguf({**meta, "tokenizer.ggml.model": "bert"})


def test_tokenizer_errors_reach_read_gguf(tmp_path, monkeypatch):
    # A file without a tokenizer, or with a merge naming no vocabulary tokens, fails before any
    # tensor is read.
    from mlxgen.loading import gguf as loader

    syn = write_synthetic(tmp_path / "n.gguf", drop_meta=("tokenizer.ggml.tokens",))
    monkeypatch.setattr(loader, "_load_tensor", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(ModelLoadError, match="has no tokenizer"):
        read_gguf(syn.path)
    monkeypatch.undo()
    _, _, merges = tiny_vocab()
    bad = {"tokenizer.ggml.merges": merges + ["xq zq"]}
    syn = write_synthetic(tmp_path / "m.gguf", extra_meta=bad)
    monkeypatch.setattr(loader, "_load_tensor", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(ModelLoadError, match="does not name two vocabulary tokens"):
        read_gguf(syn.path)


@pytest.mark.parametrize("pre, pieces", [
    ("gpt2", ["x", "   ", " 12345", " it", "'s"]),
    ("smollm", ["x", "    ", "1", "2", "3", "4", "5", " it", "'s"]),
    ("llama-bpe", ["x", "   ", " ", "123", "45", " it", "'s"]),
    ("qwen2", ["x", "   ", " ", "1", "2", "3", "4", "5", " it", "'s"]),
])
def test_pre_tokenizer_families(pre, pieces):
    tokens, types, merges = tiny_vocab()
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens":
            tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    split = tokenizer_from_gguf(meta).tokenizer.pre_tokenizer.pre_tokenize_str("x    12345 it's")
    assert [p.replace("\u0120", " ") for p, _ in split] == pieces


def test_sentencepiece_tokenizer_matches_sentencepiece():
    spm = pytest.importorskip("sentencepiece")
    import io
    import random

    random.seed(0)
    words = "the quick brown fox jumps over lazy dog hello world token merge byte llama".split()
    corpus = [" ".join(random.choices(words, k=12)) for _ in range(300)] + ["Hello, World! 123"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=["<tool>"], minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    kind = lambda i: (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                      else 4 if sp.id_to_piece(i) == "<tool>" else 1)
    parts = tokenizer_from_gguf({
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id()})
    tok = parts.tokenizer
    assert parts.add_bos_token is True and parts.bos_token_id == sp.bos_id()
    for text in ["hello world", "the quick brown fox", "Hello, World! 123", "naïve café 😀 ☃",
                 "  two  spaces", "x\ny", "quickbrownfoxjumps", "lazy dogs jumped", ""]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == text
    # llama.cpp rule: every text segment next to a special token gets its own space prefix.
    pieces = [tok.encode(s, add_special_tokens=False).ids for s in ("hi", " there")]
    assert tok.encode("hi<tool> there", add_special_tokens=False).ids == (
        pieces[0] + [sp.piece_to_id("<tool>")] + pieces[1])


# --- real files ---------------------------------------------------------------------------------
need_qwen = pytest.mark.skipif(
    not QWEN_GGUF.is_file(), reason=f"{QWEN_GGUF} missing (set MLXGEN_TEST_QWEN_GGUF)")
need_smol = pytest.mark.skipif(
    not SMOLLM2_GGUF.is_file(), reason=f"{SMOLLM2_GGUF} missing (set MLXGEN_TEST_SMOLLM2_GGUF)")


@pytest.fixture(scope="module")
def qwen():
    return read_gguf(QWEN_GGUF)


@pytest.fixture(scope="module")
def smol():
    return read_gguf(SMOLLM2_GGUF)


@need_qwen
def test_real_qwen_mixed_types(qwen):
    cfg = qwen.config
    heads = (cfg["num_attention_heads"], cfg["num_key_value_heads"])
    assert cfg["num_hidden_layers"] == 24 and heads == (14, 2)
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]) == (896, 4864, 64)
    assert cfg["rope_theta"] == 1e6 and cfg["rms_norm_eps"] == 1e-6 and cfg["vocab_size"] == 151936
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is False
    biases = [f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(24) for p in "qkv"]
    assert all(b in qwen.weights for b in biases)
    types = {"Q5_0": 133, "F32": 121, "Q8_0": 13, "Q6_K": 12, "Q4_K": 12}
    assert qwen.metadata["tensor_types"] == types
    assert qwen.metadata["dequantized"] == {} and qwen.metadata["approximated"] == {"Q6_K": 12}
    header = read_gguf_header(QWEN_GGUF)
    infos = {t.name: t for t in header.tensors}
    for name, module in [("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj"),
                         ("output.weight", "lm_head"), ("token_embd.weight", "model.embed_tokens"),
                         ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj"),
                         ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj")]:
        t = infos[name]  # first 512 rows, enough to cover every block layout
        raw = np.frombuffer(header.buffer, np.uint8, t.nbytes, t.offset).reshape(t.shape[0], -1)
        expected = dequantize(raw[:512], t.qtype)
        got = as_float32(qwen.weights, module, quantized_bits(t.qtype), rows=512)
        if t.qtype in NATIVE_BITS:
            np.testing.assert_array_equal(got, expected, err_msg=f"{name} {t.qtype.name}")
        else:  # K-quants: within the per-type bounds of tests/test_gguf_quants.py (<= 1.07 steps)
            step = np.repeat(np.array(qwen.weights[f"{module}.scales"][:512]), 32, axis=-1)
            bound = 1.07 * np.abs(step.astype(np.float32)) + 2.0**-17  # + fp16 subnormal rounding
            assert (np.abs(got - expected) <= bound).all(), name


@need_smol
def test_real_smollm2_matches_mx_load_bit_for_bit(smol):
    cfg = smol.config
    heads = (cfg["num_attention_heads"], cfg["num_key_value_heads"])
    assert cfg["num_hidden_layers"] == 30 and heads == (9, 3)
    assert cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 100000.0
    reference = mx.load(str(SMOLLM2_GGUF))
    assert len(reference) == len(smol.weights)
    for key, ref in reference.items():
        parts = key.split(".")
        stem = ".".join(parts[:-1]) + ".weight"
        module = {"token_embd.weight": "model.embed_tokens", "output_norm.weight": "model.norm"}.get(
            stem) or f"model.layers.{parts[1]}.{HF_NAMES[parts[2]]}"
        ref = np.array(ref)
        if len(parts) == 4 and parts[2] in ("attn_q", "attn_k"):
            unpermuted = np.empty_like(ref)
            unpermuted[gguf_row_order(ref.shape[0], 9 if parts[2] == "attn_q" else 3)] = ref
            ref = unpermuted
        got = np.array(smol.weights[f"{module}.{parts[-1]}"])
        assert got.dtype == ref.dtype and np.array_equal(got, ref), key


@pytest.mark.parametrize("key, path", [("smollm2", SMOLLM2_GGUF), ("qwen", QWEN_GGUF)])
def test_real_tokenizers_match_transformers_golden(key, path, request):
    if not path.is_file():
        pytest.skip(f"{path} missing")
    parts = request.getfixturevalue("smol" if key == "smollm2" else "qwen").tokenizer
    tok = parts.tokenizer
    for text in TOKENIZER_CASES:
        golden = GOLDEN_IDS[key][text]
        if key == "qwen" and unicodedata.normalize("NFC", text) != text:
            golden = GOLDEN_IDS[key][unicodedata.normalize("NFC", text)]  # Qwen2 NFC-normalizes
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == golden, text
        decoded = unicodedata.normalize("NFC", text) if key == "qwen" else text
        assert tok.decode(ids, skip_special_tokens=False) == decoded, text
    if key == "smollm2":  # digits are split off before the GPT-2 regex (transformers skips this)
        digits = [tok.token_to_id(d) for d in "0746758"]
        assert tok.encode("x        0746758").ids == tok.encode("x        ").ids + digits
    im_start = tok.token_to_id("<|im_start|>")
    assert tok.encode("<|im_start|>", add_special_tokens=False).ids == [im_start]
    assert parts.chat_template and "im_start" in parts.chat_template
    assert parts.add_bos_token is False
    assert parts.eos_token_ids == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]


@pytest.mark.skipif(not os.environ.get("MLXGEN_TEST_TRANSFORMERS"),
                    reason="slow (~40 s): set MLXGEN_TEST_TRANSFORMERS=1 to compare live")
@pytest.mark.parametrize("path", [SMOLLM2_GGUF, QWEN_GGUF])
def test_real_tokenizers_match_transformers_live(path):
    transformers = pytest.importorskip("transformers")
    if not path.is_file():
        pytest.skip(f"{path} missing")
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok = tokenizer_from_gguf(read_gguf_header(path).metadata).tokenizer
    for text in TOKENIZER_CASES:
        text = unicodedata.normalize("NFC", text)  # transformers skips Qwen2's NFC step
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == ref(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids), text
