"""Issue 19, trust on disk and store robustness: private stores, HMAC-authenticated chunk files,
key-file and kernel-library trust checks, bad store paths, failed writes, stale temporaries."""

import logging
import os
import stat

import mlx.core as mx
import pytest
from reuse_helpers import max_diff, tiny_model
from test_generate import tiny_tokenizer

import mlxgen
from mlxgen import trust
from mlxgen.backends.cpu import ext as cpu_ext
from mlxgen.errors import ChunkStoreError
from mlxgen.reuse import persist

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    tok = mlxgen.Tokenizer(tiny_tokenizer())
    return tiny_model("qwen2", vocab_size=tok.vocab_size), tok


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_store_is_private(tiny, tmp_path):
    model, tok = tiny
    store_dir = tmp_path / "store"
    mlxgen.ChunkStore(model, tok, path=store_dir).add("Paris is lovely in spring.")
    assert mode(store_dir) == 0o700
    files = list(store_dir.iterdir())
    assert {f.name for f in files} >= {"store.json", "store.key"}
    assert all(mode(f) == 0o600 for f in files), {f.name: oct(mode(f)) for f in files}


def test_forged_chunk_is_refused(tiny, tmp_path, caplog):
    """Someone who can write the store but lacks its key rewrites a chunk's K/V (and a checksum)."""
    model, tok = tiny
    store = mlxgen.ChunkStore(model, tok, path=tmp_path)
    apple = store.add("I like apple pie.")
    file = tmp_path / f"{apple.key}.safetensors"
    arrays, meta = mx.load(str(file), return_metadata=True)
    forged = dict(arrays, keys=arrays["keys"][::-1], values=arrays["values"] * 2)  # other K/V
    forged_meta = dict(meta, hmac=persist.tag(os.urandom(32), meta, [forged["keys"],
                                                                    forged["values"],
                                                                    forged["token_ids"]]))
    mx.save_safetensors(str(file), forged, forged_meta)
    fresh = mlxgen.ChunkStore(model, tok, path=tmp_path)
    with caplog.at_level(logging.WARNING, logger="mlxgen"):
        kv = fresh.get(apple)
    assert "fails authentication" in caplog.text and fresh.encoded == 1
    assert max_diff(kv.keys, store.get(apple).keys) < TOL  # the real apple, re-encoded
    assert file.with_suffix(".corrupt").exists()


def test_old_unkeyed_format_is_re_encoded(tiny, tmp_path):
    model, tok = tiny
    store = mlxgen.ChunkStore(model, tok, path=tmp_path)
    chunk = store.add("Paris is lovely in spring.")
    file = tmp_path / f"{chunk.key}.safetensors"
    arrays, meta = mx.load(str(file), return_metadata=True)
    mx.save_safetensors(str(file), arrays, dict(meta, format_version="1", sha256="0" * 64))
    fresh = mlxgen.ChunkStore(model, tok, path=tmp_path)
    fresh.get(chunk)
    assert fresh.encoded == 1


def test_key_file_must_be_private(tiny, tmp_path):
    model, tok = tiny
    mlxgen.ChunkStore(model, tok, path=tmp_path)
    os.chmod(tmp_path / "store.key", 0o644)
    with pytest.raises(ChunkStoreError, match="not private.*readable by group or others"):
        mlxgen.ChunkStore(model, tok, path=tmp_path)
    os.chmod(tmp_path / "store.key", 0o600)
    (tmp_path / "store.key").write_bytes(b"short")
    with pytest.raises(ChunkStoreError, match="damaged"):
        mlxgen.ChunkStore(model, tok, path=tmp_path)


def test_bad_store_paths(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ChunkStoreError, match="empty"):
        mlxgen.ChunkStore(model, tok, path="")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ChunkStoreError, match="is a file"):
        mlxgen.ChunkStore(model, tok, path=tmp_path / "file")
    with pytest.raises(ChunkStoreError, match="cannot create"):
        mlxgen.ChunkStore(model, tok, path=tmp_path / "file" / "sub")
    with pytest.raises(ChunkStoreError, match="directory path or None"):
        mlxgen.ChunkStore(model, tok, path=3)


def test_read_only_store_fails_before_encoding(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    mlxgen.ChunkStore(model, tok, path=tmp_path)
    monkeypatch.setattr(persist.os, "access", lambda *a, **k: False)  # root ignores chmod
    with pytest.raises(ChunkStoreError, match="not writable"):
        mlxgen.ChunkStore(model, tok, path=tmp_path)


def test_failed_write_keeps_the_chunk_in_memory(tiny, tmp_path, monkeypatch, caplog):
    model, tok = tiny
    store = mlxgen.ChunkStore(model, tok, path=tmp_path)

    def full_disk(*a, **k):
        raise RuntimeError("[save_safetensors] no space left on device")

    monkeypatch.setattr(persist.mx, "save_safetensors", full_disk)
    with caplog.at_level(logging.WARNING, logger="mlxgen"):
        chunk = store.add("Paris is lovely in spring.")
    assert "kept in memory only" in caplog.text and chunk in store
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".*tmp*"))
    out = mlxgen.generate(model, tok, ["Hi", chunk], max_tokens=2)
    assert isinstance(out, str)


def test_dead_writers_temporaries_are_removed(tiny, tmp_path):
    model, tok = tiny
    mlxgen.ChunkStore(model, tok, path=tmp_path)
    dead = tmp_path / ".abcd.999999999.tmp.safetensors"
    live = tmp_path / f".abcd.{os.getpid()}.tmp.safetensors"
    manifest_tmp = tmp_path / "store.999999999.tmp"
    for f in (dead, live, manifest_tmp):
        f.write_bytes(b"partial")
    mlxgen.ChunkStore(model, tok, path=tmp_path)
    assert not dead.exists() and not manifest_tmp.exists() and live.exists()


# --- the CPU-kernel library in the cache dir -------------------------------------------------
def test_untrusted_reason(tmp_path):
    f = tmp_path / "lib.so"
    f.write_bytes(b"x")
    os.chmod(tmp_path, 0o755)
    os.chmod(f, 0o755)
    assert trust.safe_to_load(f)
    os.chmod(f, 0o775)
    assert "writable by group" in trust.untrusted_reason(f)
    os.chmod(f, 0o755)
    os.chmod(tmp_path, 0o777)
    assert "directory" in trust.untrusted_reason(f)
    os.chmod(tmp_path, 0o755)
    link = tmp_path / "link.so"
    link.symlink_to(f)
    assert "symbolic link" in trust.untrusted_reason(link)
    os.chmod(f, 0o644)
    assert trust.check_private_file(f) == "it is readable by group or others"


def test_writable_kernel_library_is_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXGEN_CACHE_DIR", str(tmp_path))
    out = cpu_ext.build_dir()
    out.mkdir(parents=True)
    planted = out / f"{cpu_ext.MODULE}.cpython-planted.so"
    planted.write_bytes(b"not a library")
    os.chmod(planted, 0o666)
    monkeypatch.setattr(cpu_ext.shutil, "which", lambda *a, **k: None)  # stop before a build
    with pytest.raises(cpu_ext.CpuKernelBuildError, match="cmake"):
        cpu_ext.build()
    assert not out.exists() and list(out.parent.glob(f"{out.name}.untrusted-*"))
    out.mkdir()
    (out / planted.name).write_bytes(b"not a library")
    os.chmod(out / planted.name, 0o755)
    assert cpu_ext.build() == out / planted.name  # a private one is used as before
