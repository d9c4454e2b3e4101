"""Issue 19, loading side: memory bombs and malformed fields in config.json / GGUF headers end in
a ModelLoadError naming the field and the file, fast and before anything large is allocated."""

import json
import struct
import time

import pytest
from gguf_fixtures import write_synthetic
from test_loading_hf import LLAMA, hf_weights, reference, write_model

import mlxgen
from mlxgen.errors import ModelLoadError
from mlxgen.loading.gguf_header import _Cursor, read_gguf_header


def load_error(path, *patterns, seconds=5.0):
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        mlxgen.load(path)
    assert time.perf_counter() - start < seconds
    for p in patterns:
        assert p in str(e.value), str(e.value)
    return str(e.value)


@pytest.fixture(scope="module")
def llama_weights(tmp_path_factory):
    from conftest import _randomize

    return hf_weights(reference(LLAMA, _randomize))


@pytest.mark.parametrize("field,value,says", [
    ("num_hidden_layers", 100000, "num_hidden_layers"), ("num_hidden_layers", 10**6, "num_hidden_layers"),
    ("num_hidden_layers", 3, "weights hold layers 0..1"),
    ("hidden_size", "abc", "must be an integer"), ("hidden_size", 2**31, "hidden_size"),
    ("head_dim", 0, "head_dim"), ("num_attention_heads", 0, "num_attention_heads"),
    ("vocab_size", 1e12, "vocab_size"), ("vocab_size", 10**12, "vocab_size"),
    ("rms_norm_eps", "x", "rms_norm_eps"), ("rope_theta", -1.0, "rope_theta"),
    ("num_key_value_heads", 3, "multiple"), ("intermediate_size", 7, "intermediate_size"),
])
def test_config_json_fields(tmp_path, llama_weights, field, value, says):
    path = write_model(tmp_path / "m", dict(LLAMA, **{field: value}), llama_weights)
    msg = load_error(path, says, str(path / "config.json"))
    assert field in msg


def test_config_json_nesting_and_size(tmp_path, llama_weights):
    path = write_model(tmp_path / "m", LLAMA, llama_weights)
    (path / "config.json").write_text("[" * 200000 + "]" * 200000)
    load_error(path, "nests JSON too deeply", "config.json")
    (path / "config.json").write_text(json.dumps(LLAMA))
    (path / "tokenizer_config.json").write_text("[" * 200000 + "]" * 200000)
    load_error(path, "tokenizer_config.json")


# --- GGUF header edits ---------------------------------------------------------------------------
@pytest.mark.parametrize("meta,says", [
    ({"general.alignment": 0}, "general.alignment"), ({"general.alignment": "x"}, "general.alignment"),
    ({"general.alignment": 48}, "general.alignment"),
    ({"llama.attention.head_count": 0}, "'llama.attention.head_count'"),
    ({"llama.embedding_length": 2**31}, "llama.embedding_length"),
    ({"llama.embedding_length": "abc"}, "llama.embedding_length"),
    ({"llama.attention.key_length": 0}, "llama.attention.key_length"),
    ({"llama.block_count": 100000}, "llama.block_count"),
    ({"llama.block_count": 3}, "llama.block_count"),
    ({"llama.attention.layer_norm_rms_epsilon": "tiny"}, "layer_norm_rms_epsilon"),
    ({"llama.context_length": 0}, "llama.context_length"),
])
def test_gguf_metadata_fields(tmp_path, meta, says):
    syn = write_synthetic(tmp_path / "m.gguf", "llama", extra_meta=meta)
    load_error(syn.path, says, str(syn.path))


def _tensor_dims_offset(path) -> int:
    """Byte offset of the first tensor's dimension count in a GGUF file."""
    with open(path, "rb") as f:
        import mmap

        cur = _Cursor(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    cur.pos = 8
    _, n_kv = cur.u64(), cur.u64()
    for _ in range(n_kv):
        cur.string()
        cur.value(cur.u32())
    cur.string()
    return cur.pos


@pytest.mark.parametrize("value", [2**32 - 1, 0, 5])
def test_gguf_dimension_count(tmp_path, value):
    syn = write_synthetic(tmp_path / "m.gguf", "llama")
    data = bytearray(syn.path.read_bytes())
    at = _tensor_dims_offset(syn.path)
    data[at:at + 4] = struct.pack("<I", value)
    syn.path.write_bytes(bytes(data))
    load_error(syn.path, "dimensions", seconds=2.0)


def test_gguf_huge_counts_and_nesting(tmp_path):
    path = tmp_path / "n.gguf"
    key = struct.pack("<Q", 1) + b"x"
    nested = struct.pack("<I", 9) + (struct.pack("<IQ", 9, 1)) * 200000
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + key + nested)
    load_error(path, "nested deeper", seconds=2.0)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**62, 2**62) + b"\0" * 64)
    load_error(path, "count", seconds=2.0)
    strings = struct.pack("<I", 9) + struct.pack("<IQ", 8, 2**40)  # 2**40 strings promised
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + key + strings + b"\0" * 64)
    load_error(path, "array count", seconds=2.0)


def test_gguf_dimension_larger_than_file(tmp_path):
    syn = write_synthetic(tmp_path / "m.gguf", "llama")
    at = _tensor_dims_offset(syn.path)
    data = bytearray(syn.path.read_bytes())
    data[at + 4:at + 12] = struct.pack("<Q", 2**40 * 32)
    syn.path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="corrupt shape"):
        read_gguf_header(syn.path)  # the header reader refuses it: no tensor is read
