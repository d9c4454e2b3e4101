"""Resolving `ollama:NAME[:TAG]` against a fake Ollama store built in tmp_path."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from gguf_fixtures import write_synthetic  # noqa: E402

from mlxgen.errors import ModelLoadError, OllamaModelNotFound  # noqa: E402
from mlxgen.loading.gguf import read_gguf  # noqa: E402
from mlxgen.loading.ollama import (  # noqa: E402
    list_ollama_models, ollama_models_dir, parse_ollama_spec, resolve_ollama_model,
)

MODEL = "application/vnd.ollama.image.model"


def install(root: Path, blob_bytes: bytes, *path_parts: str, layers: list | None = None,
            write_blob: bool = True) -> Path:
    """Write manifests/<path_parts> and blobs/sha256-<digest> as `ollama pull` does."""
    digest = hashlib.sha256(blob_bytes).hexdigest()
    blob = root / "blobs" / f"sha256-{digest}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    if write_blob:
        blob.write_bytes(blob_bytes)
    if layers is None:
        layers = [
            {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64,
             "size": 10},
            {"mediaType": MODEL, "digest": f"sha256:{digest}", "size": len(blob_bytes)},
        ]
    manifest = root / "manifests" / Path(*path_parts)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    return blob


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    return write_synthetic(tmp_path_factory.mktemp("g") / "m.gguf").path.read_bytes()


@pytest.fixture
def store(tmp_path, gguf_bytes) -> Path:
    root = tmp_path / "models"
    install(root, gguf_bytes, "registry.ollama.ai", "library", "tiny", "latest")
    install(root, gguf_bytes + b"\0" * 32, "registry.ollama.ai", "library", "tiny", "q8")
    install(root, gguf_bytes, "registry.ollama.ai", "alice", "mine", "v1")
    install(root, gguf_bytes, "example.com:5000", "team", "big", "latest")
    return root


def test_resolve_default_tag_explicit_tag_namespace_and_host(store, gguf_bytes):
    blob = resolve_ollama_model("tiny", store)
    assert blob == resolve_ollama_model("tiny:latest", store)
    assert blob.read_bytes() == gguf_bytes and blob.name.startswith("sha256-")
    assert resolve_ollama_model("tiny:q8", store) != blob
    assert resolve_ollama_model("alice/mine:v1", store).is_file()
    assert resolve_ollama_model("registry.ollama.ai/library/tiny", store) == blob
    assert resolve_ollama_model("example.com:5000/team/big", store).is_file()
    assert read_gguf(blob).config["model_type"] == "llama"  # the blob is a loadable GGUF


def test_models_dir_from_env(store, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    assert ollama_models_dir() == store
    assert resolve_ollama_model("tiny").is_file()
    monkeypatch.delenv("OLLAMA_MODELS")
    monkeypatch.setenv("HOME", "/nonexistent-home")
    assert ollama_models_dir() == Path("/nonexistent-home/.ollama/models")


def test_parse_spec():
    assert parse_ollama_spec("qwen2.5:0.5b") == ("registry.ollama.ai", "library", "qwen2.5", "0.5b")
    assert parse_ollama_spec("u/m") == ("registry.ollama.ai", "u", "m", "latest")
    assert parse_ollama_spec("h:1/n/m:t") == ("h:1", "n", "m", "t")
    for bad in ["", "a/b/c/d", "../x", "x:", "a//b"]:
        with pytest.raises(OllamaModelNotFound, match="not a valid Ollama model name"):
            parse_ollama_spec(bad)


def test_unknown_model_lists_installed(store):
    assert list_ollama_models(store) == [
        "example.com:5000/team/big:latest", "alice/mine:v1", "tiny:latest", "tiny:q8"]
    with pytest.raises(OllamaModelNotFound) as e:
        resolve_ollama_model("llama3:8b", store)
    msg = str(e.value)
    assert "tiny:latest" in msg and "alice/mine:v1" in msg and "ollama pull llama3:8b" in msg
    with pytest.raises(OllamaModelNotFound, match="tiny:latest"):
        resolve_ollama_model("tiny:nosuchtag", store)


def test_missing_store(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "absent"))
    with pytest.raises(OllamaModelNotFound, match="OLLAMA_MODELS") as e:
        resolve_ollama_model("tiny")
    assert str(tmp_path / "absent") in str(e.value)
    assert isinstance(e.value, ModelLoadError)


def test_missing_blob_bad_manifest_and_partial_download(tmp_path, gguf_bytes):
    root = tmp_path / "models"
    install(root, gguf_bytes, "registry.ollama.ai", "library", "gone", "latest", write_blob=False)
    with pytest.raises(OllamaModelNotFound, match="missing.*ollama pull gone"):
        resolve_ollama_model("gone", root)
    install(root, gguf_bytes, "registry.ollama.ai", "library", "nolayer", "latest",
            layers=[{"mediaType": "application/vnd.ollama.image.license", "digest": "sha256:ab"}])
    with pytest.raises(OllamaModelNotFound, match="no model layer"):
        resolve_ollama_model("nolayer", root)
    (root / "manifests/registry.ollama.ai/library/broken").mkdir(parents=True)
    (root / "manifests/registry.ollama.ai/library/broken/latest").write_text("{not json")
    with pytest.raises(OllamaModelNotFound, match="unreadable"):
        resolve_ollama_model("broken", root)
    blob = install(root, gguf_bytes, "registry.ollama.ai", "library", "partial", "latest")
    blob.write_bytes(gguf_bytes[:100])
    with pytest.raises(OllamaModelNotFound, match="incomplete"):
        resolve_ollama_model("partial", root)


def test_legacy_colon_blob_name(tmp_path, gguf_bytes):
    root = tmp_path / "models"
    blob = install(root, gguf_bytes, "registry.ollama.ai", "library", "old", "latest")
    legacy = blob.with_name(blob.name.replace("sha256-", "sha256:"))
    blob.rename(legacy)
    assert resolve_ollama_model("old", root) == legacy
