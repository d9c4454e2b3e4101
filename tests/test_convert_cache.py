"""The converted-weights cache (mlxgen/loading/converted.py): a later load of the same GGUF is
served from disk and is identical to a conversion; another file, a file changed in place, other
options, or a damaged entry never serve the wrong weights; the cache stays under its cap."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import pytest
from gguf import GGMLQuantizationType as QT
from mlx.utils import tree_flatten

import mlxgen
from mlxgen.errors import ConfigError
from mlxgen.loading import converted, gguf
from gguf_fixtures import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["the cat", "<|im_start|>user\nthe the<|im_end|>\n", "<|endoftext|>x", "", " t he"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The cache on, in a directory of this test (MLXGEN_CACHE_DIR itself stays: the CPU
    kernels are built under it). Returns the cache root and a list of converted paths."""
    monkeypatch.setenv("MLXGEN_CONVERT_CACHE", "on")
    monkeypatch.setattr(converted, "root", lambda: tmp_path / "converted")
    conversions = []
    read = gguf.read_gguf

    def counting(path, *a, **kw):
        conversions.append(Path(path))
        return read(path, *a, **kw)

    monkeypatch.setattr(gguf, "read_gguf", counting)
    yield tmp_path / "converted", conversions
    converted.wait_for_writes()


def _synthetic(path: Path, seed: int = 0) -> Path:
    # a K-quant (Q6_K, repacked approximately) beside the native types of MIXED_TYPES
    return write_synthetic(path, ff=256, types={"ffn_down": QT.Q6_K}, seed=seed).path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return _synthetic(tmp_path_factory.mktemp("cc") / "m.gguf")


def _params(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def assert_same_model(a, b) -> None:
    (ma, ta), (mb, tb) = a, b
    pa, pb = _params(ma), _params(mb)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and pa[k].shape == pb[k].shape, k
        assert mx.array_equal(pa[k], pb[k]).item(), k
    for text in TEXTS:
        assert ta.encode(text) == tb.encode(text)
        assert ta.encode(text, parse_special=False) == tb.encode(text, parse_special=False)
    assert (ta.bos_token_id, ta.eos_token_ids, ta.add_bos_token, ta.chat_template) == \
        (tb.bos_token_id, tb.eos_token_ids, tb.add_bos_token, tb.chat_template)
    assert ma.info.extra == mb.info.extra and ma.info.quantization == mb.info.quantization
    assert ma.args == mb.args


def _greedy(loaded, n: int = 8) -> list[int]:
    model, tok = loaded
    return [r.token for r in mlxgen.stream_generate(model, tok, "the cat", max_tokens=n,
                                                    temperature=0.0)]


def test_second_load_is_served_from_the_cache_and_identical(cache, model_file):
    root, conversions = cache
    first = mlxgen.load(model_file)
    converted.wait_for_writes()
    assert conversions == [model_file] and len(converted.entries()) == 1
    second = mlxgen.load(model_file)
    assert conversions == [model_file], "the second load converted the file again"
    assert_same_model(first, second)
    assert_same_model(first, mlxgen.load(model_file, cache=False))
    assert _greedy(first) == _greedy(second)
    assert not list(root.glob(".*")), "temporary directories were left behind"


def test_the_first_load_returns_before_its_entry_is_written(cache, model_file, monkeypatch):
    root, conversions = cache
    release, save = threading.Event(), converted.mx.save_safetensors

    def held(*a, **kw):
        assert release.wait(120), "the test never released the write"
        save(*a, **kw)

    monkeypatch.setattr(converted.mx, "save_safetensors", held)
    first = mlxgen.load(model_file)  # returns while its entry's write is held
    assert converted.entries() == []
    tokens = _greedy(first)  # and the model runs meanwhile
    release.set()
    second = mlxgen.load(model_file)  # waits for this process's write, then reads the entry
    assert conversions == [model_file]
    assert_same_model(first, second)
    assert _greedy(second) == tokens


def test_other_options_and_other_files_never_share_an_entry(cache, model_file, tmp_path):
    root, conversions = cache
    mlxgen.load(model_file)
    f16 = mlxgen.load(model_file, dtype="float16")  # other scale dtypes: its own entry
    converted.wait_for_writes()
    assert len(converted.entries()) == 2 and len(conversions) == 2
    assert_same_model(f16, mlxgen.load(model_file, dtype="float16", cache=False))
    mlxgen.load(model_file, quantized="dequantize")  # the float32 reference is not cached
    assert len(converted.entries()) == 2
    copy = tmp_path / "copy.gguf"  # same bytes, another file
    copy.write_bytes(model_file.read_bytes())
    mlxgen.load(copy)
    converted.wait_for_writes()
    assert len(converted.entries()) == 3 and conversions[-1] == copy


def _forge(path: Path, offset: int, data: bytes) -> None:
    """Rewrite bytes in place keeping size, inode and mtime: only the content hashes tell."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_ino == st.st_ino and os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_a_file_changed_in_place_with_a_forged_mtime_is_converted_again(cache, tmp_path):
    root, conversions = cache
    path = _synthetic(tmp_path / "f.gguf")
    mlxgen.load(path)
    # the header: the chat template, same length
    raw = path.read_bytes()
    _forge(path, raw.index(b"{{ x }}"), b"{{ y }}")
    model, tok = mlxgen.load(path)
    assert len(conversions) == 2 and tok.chat_template == "{{ y }}"
    # the data: the last block of the last tensor (a sampled block)
    _forge(path, len(raw) - 64, bytes(64))
    loaded = mlxgen.load(path)
    assert len(conversions) == 3
    assert_same_model(loaded, mlxgen.load(path, cache=False))


@pytest.mark.parametrize("damage", ["truncate", "garbage manifest", "edited manifest",
                                    "swapped weights"])
def test_a_damaged_entry_is_rebuilt_with_one_log_line(cache, model_file, tmp_path, caplog,
                                                      damage):
    root, conversions = cache
    reference = mlxgen.load(model_file, cache=False)
    mlxgen.load(model_file)
    converted.wait_for_writes()
    (entry,) = [e[0] for e in converted.entries()]
    weights, manifest = entry / converted.WEIGHTS, entry / converted.MANIFEST
    if damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 100)
    elif damage == "garbage manifest":
        manifest.write_text("{not json")
    elif damage == "edited manifest":  # a config value changed, checksum not
        m = json.loads(manifest.read_text())
        m["body"]["config"]["rms_norm_eps"] = 0.5
        manifest.write_text(json.dumps(m))
    else:  # another entry's weights file of the same size and tensors
        other = _synthetic(tmp_path / "other.gguf", seed=1)
        mlxgen.load(other)
        converted.wait_for_writes()
        (theirs,) = [e[0] for e in converted.entries() if e[0] != entry]
        weights.write_bytes((theirs / converted.WEIGHTS).read_bytes())
    conversions.clear()
    with caplog.at_level(logging.WARNING, logger="mlxgen"):
        loaded = mlxgen.load(model_file)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "rebuilding" in warnings[0].getMessage()
    assert conversions == [model_file]
    assert_same_model(loaded, reference)
    conversions.clear()
    assert_same_model(mlxgen.load(model_file), reference)  # the rebuilt entry serves
    assert conversions == []


def test_a_failed_write_leaves_nothing_and_the_load_succeeds(cache, model_file, monkeypatch,
                                                             caplog):
    root, conversions = cache

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(converted.mx, "save_safetensors", full_disk)
    with caplog.at_level(logging.WARNING, logger="mlxgen"):
        model, _ = mlxgen.load(model_file)
        converted.wait_for_writes()
    assert "could not store" in caplog.text
    assert converted.entries() == [] and not list(root.glob(".*"))
    # a half-written directory under the entry's temporary name is never read
    monkeypatch.undo()
    monkeypatch.setattr(converted, "root", lambda: root)
    monkeypatch.setenv("MLXGEN_CONVERT_CACHE", "on")
    entry = converted.Entry(model_file, {"k_quants": True, "scale_dtype": mx.float32,
                                         "projection_scale_dtype": mx.float16})
    partial = root / f".tmp-{entry.key}-1-x"
    partial.mkdir(parents=True)
    (partial / converted.WEIGHTS).write_bytes(b"half")
    assert entry.read() is None


def test_least_recently_used_entries_are_evicted_past_the_cap(cache, tmp_path, monkeypatch):
    root, conversions = cache
    files = [_synthetic(tmp_path / f"{i}.gguf", seed=i) for i in range(3)]
    mlxgen.load(files[0])
    converted.wait_for_writes()
    size = converted.entries()[0][1]
    monkeypatch.setenv("MLXGEN_CONVERT_CACHE_BYTES", str(int(2.5 * size)))
    mlxgen.load(files[1])
    converted.wait_for_writes()
    entry_of = {e[0]: e for e in converted.entries()}
    os.utime(root / next(iter(entry_of)) / converted.MANIFEST, (1, 1))  # make one look old
    mlxgen.load(files[0])  # a hit: now the most recently used
    mlxgen.load(files[2])  # over the cap: files[1]'s entry goes
    conversions.clear()
    mlxgen.load(files[0])
    mlxgen.load(files[2])
    converted.wait_for_writes()
    assert conversions == [] and len(converted.entries()) == 2
    mlxgen.load(files[1])
    assert conversions == [files[1]]
    monkeypatch.setenv("MLXGEN_CONVERT_CACHE_BYTES", "1")  # the newest entry always stays
    mlxgen.load(files[0])
    converted.wait_for_writes()
    assert len(converted.entries()) == 1
    converted.clear()
    assert converted.entries() == []


def test_off_switches(cache, model_file, monkeypatch):
    root, conversions = cache
    mlxgen.load(model_file, cache=False)
    monkeypatch.setenv("MLXGEN_CONVERT_CACHE", "0")
    mlxgen.load(model_file)
    assert converted.entries() == [] and len(conversions) == 2
    monkeypatch.setenv("MLXGEN_CONVERT_CACHE", "maybe")
    with pytest.raises(ConfigError, match="MLXGEN_CONVERT_CACHE"):
        mlxgen.load(model_file)
    monkeypatch.setenv("MLXGEN_CONVERT_CACHE", "on")
    monkeypatch.setenv("MLXGEN_CONVERT_CACHE_BYTES", "lots")
    with pytest.raises(ConfigError, match="MLXGEN_CONVERT_CACHE_BYTES"):
        mlxgen.load(model_file)


CHILD = """
import sys, mlxgen
from mlx.utils import tree_flatten
model, tok = mlxgen.load(sys.argv[1], quantized="keep")
print(sum(v.size for _, v in tree_flatten(model.parameters())), tok.encode("the cat"))
"""


def test_two_processes_converting_the_same_file_at_once_both_succeed(model_file, tmp_path):
    # a cache directory of its own, and MLX's kernels off so nothing is built there
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLXGEN_CACHE_DIR=str(tmp_path),
               MLXGEN_CONVERT_CACHE="on", MLXGEN_CPU_KERNELS="off")
    run = [sys.executable, "-c", CHILD, str(model_file)]
    procs = [subprocess.Popen(run, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert outs[0][0] == outs[1][0]
    # each child exits right after its load: the interpreter waits for the background write
    entries = [d for d in (tmp_path / "converted").iterdir() if not d.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / converted.MANIFEST).is_file()
    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout == outs[0][0]


def test_hugging_face_directories_are_not_cached(cache, tmp_path):
    from mlxgen.models import model_from_config
    from test_loading_hf import LLAMA, write_model

    model = model_from_config(LLAMA)
    path = write_model(tmp_path / "hf", LLAMA, _params(model))
    mlxgen.load(path)
    converted.wait_for_writes()
    assert converted.entries() == []


def test_real_model_cached_is_identical(cache):
    """SmolLM2 through the cache: the same arrays, tokenizer and greedy tokens."""
    path = Path(os.environ["MLXGEN_TEST_SMOLLM2_GGUF"])
    first = mlxgen.load(path)
    second = mlxgen.load(path)
    assert len(cache[1]) == 1
    assert_same_model(first, second)
    tokens = _greedy(second, 12)
    assert _greedy(first, 12) == tokens and second[1].decode(tokens).strip()


def test_a_tokenizer_that_fails_on_its_thread_is_a_load_error(cache, model_file, monkeypatch):
    # A cached entry's tokenizer is built on a thread while MLX reads the weights: what that
    # thread raises reaches load() as a clear error, and cache=False still loads.
    import tokenizers

    from mlxgen.errors import ModelLoadError

    mlxgen.load(model_file)

    class Refusing:
        @staticmethod
        def from_str(text):
            raise ValueError("refused")

    with monkeypatch.context() as m:
        m.setattr(tokenizers, "Tokenizer", Refusing)
        with pytest.raises(ModelLoadError, match="cache=False"):
            mlxgen.load(model_file)
    assert mlxgen.load(model_file, cache=False)[1].encode("the cat")
