"""`mlxgen.load` on Hugging Face model directories and repo ids (offline, from a fake HF cache).

Directories are written in tmp_path: config.json, a programmatic tokenizer, and weights as one
file, as shards with an index, with tied embeddings, or MLX-quantized the way mlx-community
publishes them. Every broken directory must give a ModelLoadError with a useful message, never
an exception from inside MLX."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

import mlxgen
from mlxgen import backends
from mlxgen.errors import ModelLoadError, UnsupportedModelError
from mlxgen.models import SUPPORTED_MODEL_TYPES

VOCAB = 128
WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat", "a", "dog"]

LLAMA = dict(
    model_type="llama",
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=VOCAB,
    rope_theta=10000.0,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
QWEN3_MOE = dict(
    LLAMA, model_type="qwen3_moe", head_dim=16, num_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True,
)


# --- writing model directories ---------------------------------------------------------------


def write_tokenizer(path: Path) -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    tk = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    )


def reference(config: dict, randomize, seed: int = 0):
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    randomize(model, seed=seed)
    return model


def write_model(path: Path, config: dict, weights: dict[str, mx.array], shards: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    write_tokenizer(path)
    names = sorted(weights)
    if shards == 1:
        mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
        return path
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k] for k in names[i::shards]}
        mx.save_safetensors(str(path / file), part, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
             "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def hf_weights(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def sample_ids(n: int = 40) -> mx.array:
    return mx.random.randint(0, VOCAB, (1, n), key=mx.random.key(1))


@pytest.fixture
def llama_dir(tmp_path, randomize):
    """(directory, mlx-lm reference model) for a plain one-file llama checkpoint."""
    ref = reference(LLAMA, randomize)
    return write_model(tmp_path / "llama", LLAMA, hf_weights(ref)), ref


# --- loading ---------------------------------------------------------------------------------


def _assert_same_logits(model, ref, tol=1e-4):
    x = sample_ids()
    diff = mx.abs(model(x) - ref(x)).max().item()
    assert diff <= tol, diff
    return diff


def test_single_file(llama_dir, record_diff):
    path, ref = llama_dir
    model, tokenizer = mlxgen.load(path)
    x = sample_ids()
    assert record_diff(model(x), ref(x)) <= 1e-4
    assert model.info.format == "hf" and model.info.quantization is None
    assert tokenizer.encode("the cat sat") == [1, 5, 6, 7]  # bos added
    assert tokenizer.eos_token_ids == {2}
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize("shards", [2, 3])
def test_sharded(tmp_path, randomize, record_diff, shards):
    ref = reference(LLAMA, randomize, seed=1)
    path = write_model(tmp_path / "m", LLAMA, hf_weights(ref), shards=shards)
    assert len(list(path.glob("*.safetensors"))) == shards
    model, _ = mlxgen.load(str(path))
    x = sample_ids()
    assert record_diff(model(x), ref(x)) <= 1e-4


def test_sharded_index_ignores_stray_files(tmp_path, randomize):
    """With an index, only the listed shards are read (a leftover file must not be merged)."""
    ref = reference(LLAMA, randomize, seed=1)
    path = write_model(tmp_path / "m", LLAMA, hf_weights(ref), shards=2)
    mx.save_safetensors(str(path / "consolidated.safetensors"), {"junk": mx.zeros((2,))})
    model, _ = mlxgen.load(path)
    _assert_same_logits(model, ref)


def test_tied_embeddings(tmp_path, randomize, record_diff):
    config = dict(LLAMA, tie_word_embeddings=True)
    ref = reference(config, randomize, seed=2)
    weights = hf_weights(ref)
    assert not any(k.startswith("lm_head") for k in weights)
    model, _ = mlxgen.load(write_model(tmp_path / "tied", config, weights))
    assert "lm_head" not in model
    x = sample_ids()
    assert record_diff(model(x), ref(x)) <= 1e-4


def test_tied_embeddings_with_redundant_lm_head(tmp_path, randomize):
    """Some tied checkpoints still ship lm_head.weight (a copy): it is dropped, not an error."""
    config = dict(LLAMA, tie_word_embeddings=True)
    ref = reference(config, randomize, seed=2)
    weights = hf_weights(ref)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model, _ = mlxgen.load(write_model(tmp_path / "tied", config, weights))
    _assert_same_logits(model, ref)


# --- MLX-quantized checkpoints (mlx-community layout) ----------------------------------------


def quantized_checkpoint(path: Path, config: dict, randomize, seed: int = 3):
    """Quantize an mlx-lm model with mlx-lm's own tools and save it as mlx_lm.convert does."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    ref = reference(config, randomize, seed=seed)
    ref, qconfig = quantize_model(ref, dict(config), group_size=64, bits=4)
    save_model(path, ref)
    save_config(qconfig, path / "config.json")
    write_tokenizer(path)
    mx.eval(ref.parameters())
    return ref, qconfig


@pytest.mark.parametrize(
    "config", [dict(LLAMA, tie_word_embeddings=True), QWEN3_MOE], ids=["llama-tied", "qwen3_moe"]
)
def test_mlx_quantized(tmp_path, randomize, record_diff, config, capsys):
    ref, qconfig = quantized_checkpoint(tmp_path / "q", config, randomize)
    capsys.readouterr()
    assert qconfig["quantization"]["bits"] == 4 and qconfig["quantization"]["group_size"] == 64
    if config["model_type"] == "qwen3_moe":  # mlx-lm keeps the router at 8 bits, per layer
        assert qconfig["quantization"]["model.layers.0.mlp.gate"]["bits"] == 8
    x = sample_ids()
    want = ref(x)

    kept, _ = mlxgen.load(tmp_path / "q", quantized="keep")
    assert kept.info.quantization["bits"] == 4
    n_quantized = sum(k.endswith(".scales") for k, _ in tree_flatten(kept.parameters()))
    assert n_quantized == sum(k.endswith(".scales") for k, _ in tree_flatten(ref.parameters()))
    if config["model_type"] == "qwen3_moe":
        assert kept.layers[0].mlp.gate.bits == 8 and kept.layers[0].mlp.experts.up_proj.bits == 4
    else:
        assert kept.model.embed_tokens.bits == 4  # tied: the quantized embedding is the head too
    assert record_diff(kept(x), want, "keep") <= 1e-4

    # quantized="dequantize": float32, the same numbers up to summation order.
    deq, _ = mlxgen.load(tmp_path / "q", quantized="dequantize")
    params = tree_flatten(deq.parameters())
    assert not any(k.endswith(".scales") for k, _ in params)
    assert all(v.dtype == mx.float32 for _, v in params)
    assert record_diff(deq(x), want, "dequantized") <= 1e-3

    # The default keeps the weights packed where this backend multiplies them (on the CPU: with
    # mlxgen's kernels); only the CPU's MoE expert stacks are dequantized.
    auto, _ = mlxgen.load(tmp_path / "q")
    scales = {k for k, _ in tree_flatten(auto.parameters()) if k.endswith(".scales")}
    experts = {k for k, _ in tree_flatten(ref.parameters()) if k.endswith(".scales") and "switch_mlp" in k}
    if backends.keep_quantized():
        cpu_experts = experts if backends.device.is_cpu() else set()
        assert len(scales) == n_quantized - len(cpu_experts)
    else:
        assert not scales
    assert record_diff(auto(x), want, "default") <= 1e-3


def test_mlx_quantized_other_mode_is_rejected(tmp_path, randomize):
    """mxfp4 (no biases, uint8 scales) must not be read as affine 4-bit."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    ref = reference(LLAMA, randomize)
    ref, qconfig = quantize_model(ref, dict(LLAMA), group_size=32, bits=4, mode="mxfp4")
    save_model(tmp_path, ref)
    save_config(qconfig, tmp_path / "config.json")
    write_tokenizer(tmp_path)
    _load_error(tmp_path, "mxfp4", UnsupportedModelError)


@pytest.mark.parametrize(
    "qconfig",
    [
        {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"},
        {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False},
        {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
    ],
    ids=["awq", "gptq", "fp8"],
)
def test_transformers_quantized_checkpoint_is_rejected(llama_dir, qconfig):
    """GPTQ/AWQ/FP8 repos carry `quantization_config` with a quant_method, not MLX's layout."""
    path, _ = llama_dir
    (path / "config.json").write_text(json.dumps(dict(LLAMA, quantization_config=qconfig)))
    _load_error(path, qconfig["quant_method"], UnsupportedModelError)


# --- broken directories ----------------------------------------------------------------------


def _load_error(path, match: str, cls=ModelLoadError) -> str:
    with pytest.raises(cls, match=match) as e:
        mlxgen.load(path)
    return str(e.value)


def test_missing_config(llama_dir):
    path, _ = llama_dir
    (path / "config.json").unlink()
    _load_error(path, "config.json")


def test_invalid_json_config(llama_dir):
    path, _ = llama_dir
    (path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    _load_error(path, "not valid JSON")


def test_config_not_an_object(llama_dir):
    path, _ = llama_dir
    (path / "config.json").write_text("[1, 2]")
    _load_error(path, "JSON object")


def test_config_missing_keys(llama_dir):
    path, _ = llama_dir
    config = dict(LLAMA)
    del config["num_attention_heads"], config["vocab_size"]
    (path / "config.json").write_text(json.dumps(config))
    msg = _load_error(path, "num_attention_heads")
    assert "vocab_size" in msg


def test_unsupported_model_type(llama_dir):
    path, _ = llama_dir
    (path / "config.json").write_text(json.dumps(dict(LLAMA, model_type="gpt_neox")))
    msg = _load_error(path, "gpt_neox", UnsupportedModelError)
    assert all(t in msg for t in SUPPORTED_MODEL_TYPES)


def test_missing_shard(tmp_path, randomize):
    ref = reference(LLAMA, randomize)
    path = write_model(tmp_path / "m", LLAMA, hf_weights(ref), shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()
    _load_error(path, "model-00002-of-00003.safetensors")


def test_malformed_index(tmp_path, randomize):
    ref = reference(LLAMA, randomize)
    path = write_model(tmp_path / "m", LLAMA, hf_weights(ref), shards=2)
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    _load_error(path, "malformed")


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_safetensors(llama_dir, keep):
    path, _ = llama_dir
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])
    msg = _load_error(path, "truncated or corrupt")
    assert "model.safetensors" in msg


def test_no_weights(llama_dir):
    path, _ = llama_dir
    (path / "model.safetensors").unlink()
    _load_error(path, "safetensors")


def test_missing_tokenizer(llama_dir):
    path, _ = llama_dir
    (path / "tokenizer.json").unlink()
    _load_error(path, "tokenizer.json")


def test_weight_shape_mismatch(tmp_path, randomize):
    """config.json says hidden 64, the weights are from a hidden-32 model."""
    small = reference(dict(LLAMA, hidden_size=32), randomize)
    path = write_model(tmp_path / "m", LLAMA, hf_weights(small))
    msg = _load_error(path, "hidden_size is 64 but tensor")  # checked before the model is built
    assert "model.norm.weight" in msg and "(32,)" in msg


def test_missing_tensor(tmp_path, randomize):
    ref = reference(LLAMA, randomize)
    weights = hf_weights(ref)
    del weights["model.layers.1.mlp.down_proj.weight"]
    path = write_model(tmp_path / "m", LLAMA, weights)
    _load_error(path, r"missing 1 tensors.*model\.layers\.1\.mlp\.down_proj\.weight")


def test_unexpected_tensor(tmp_path, randomize):
    ref = reference(LLAMA, randomize)
    weights = hf_weights(ref)
    weights["model.layers.0.self_attn.q_proj.bias"] = mx.zeros((64,))
    path = write_model(tmp_path / "m", LLAMA, weights)
    _load_error(path, "unexpected 1 tensors")


def test_missing_tied_head_is_an_error_when_untied(tmp_path, randomize):
    """tie_word_embeddings false but no lm_head in the file: report it, don't tie silently."""
    ref = reference(LLAMA, randomize)
    weights = hf_weights(ref)
    del weights["lm_head.weight"]
    _load_error(write_model(tmp_path / "m", LLAMA, weights), "lm_head.weight")


def test_nonexistent_path():
    with pytest.raises(ModelLoadError, match="not found"):
        mlxgen.load("/nonexistent/dir/for/mlxgen")


# --- Hugging Face repo ids, offline ----------------------------------------------------------


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with an empty private cache. huggingface_hub reads the environment once
    at import, so its module constants are patched as well."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_repo_id_offline_not_cached(offline_hub):
    with pytest.raises(ModelLoadError) as e:
        mlxgen.load("org/does-not-exist")
    msg = str(e.value)
    assert "org/does-not-exist" in msg
    assert "offline" in msg.lower() and "cache" in msg.lower()


def test_repo_id_offline_from_cache(offline_hub, randomize, record_diff):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--org--tiny-llama"
    ref = reference(LLAMA, randomize, seed=4)
    snapshot = write_model(repo / "snapshots" / commit, LLAMA, hf_weights(ref), shards=2)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model, tokenizer = mlxgen.load("org/tiny-llama")
    assert Path(model.info.path).resolve() == snapshot.resolve()
    assert model.info.source == "org/tiny-llama"
    assert tokenizer.encode("hello world") == [1, 3, 4]
    x = sample_ids()
    assert record_diff(model(x), ref(x)) <= 1e-4
