"""Find the GGUF blob behind an Ollama model name (`ollama pull` layout) without running Ollama.

Store layout: manifests/HOST/NAMESPACE/NAME/TAG is a JSON manifest whose layer with mediaType
application/vnd.ollama.image.model names the GGUF blob "sha256:HEX", stored at blobs/sha256-HEX."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import OllamaModelNotFound

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"


def ollama_models_dir() -> Path:
    """The Ollama model store: $OLLAMA_MODELS, else ~/.ollama/models."""
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


def parse_ollama_spec(spec: str) -> tuple[str, str, str, str]:
    """'name', 'name:tag', 'user/name:tag' or 'host/ns/name:tag' -> (host, namespace, name, tag)."""
    path, tag = spec.strip(), "latest"
    head, _, last = path.rpartition("/")
    if ":" in last:  # a ':' before the last '/' is a registry port, not a tag
        last, tag = last.split(":", 1)
        path = f"{head}/{last}" if head else last
    parts = path.split("/")
    if len(parts) > 3 or not all(parts) or not tag or any(p in (".", "..") for p in parts + [tag]):
        raise OllamaModelNotFound(
            f"{spec!r} is not a valid Ollama model name; expected NAME[:TAG], "
            "NAMESPACE/NAME[:TAG] or HOST/NAMESPACE/NAME[:TAG] (e.g. qwen2.5:0.5b)."
        )
    parts = [DEFAULT_HOST, DEFAULT_NAMESPACE][: 3 - len(parts)] + parts
    return parts[0], parts[1], parts[2], tag


def list_ollama_models(models_dir: Path | None = None) -> list[str]:
    """Installed models as the names `ollama list` shows (e.g. 'qwen2.5:0.5b', 'user/m:latest')."""
    root = (models_dir or ollama_models_dir()) / "manifests"
    names = []
    for manifest in sorted(root.glob("*/*/*/*")):
        if not manifest.is_file():
            continue
        host, ns, name, tag = manifest.relative_to(root).parts
        prefix = "" if host == DEFAULT_HOST and ns == DEFAULT_NAMESPACE else (
            f"{ns}/" if host == DEFAULT_HOST else f"{host}/{ns}/")
        names.append(f"{prefix}{name}:{tag}")
    return names


def resolve_ollama_model(spec: str, models_dir: Path | None = None) -> Path:
    """Path of the GGUF blob for an Ollama model spec like 'qwen2.5:0.5b'."""
    root = Path(models_dir) if models_dir is not None else ollama_models_dir()
    if not (root / "manifests").is_dir():
        raise OllamaModelNotFound(
            f"No Ollama model store at {root} (no manifests/ folder). Install Ollama and "
            "`ollama pull` a model, or set OLLAMA_MODELS to the store's models directory."
        )
    host, ns, name, tag = parse_ollama_spec(spec)
    manifest_path = root / "manifests" / host / ns / name / tag
    if not manifest_path.is_file():
        installed = list_ollama_models(root)
        listing = ", ".join(installed) if installed else "none"
        raise OllamaModelNotFound(
            f"Ollama model {spec!r} is not installed (no {manifest_path}); installed: {listing}. "
            f"Run `ollama pull {spec}` first, or pick one of the installed models."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        layers = manifest.get("layers", [])
        digest = next((l["digest"] for l in layers if l.get("mediaType") == MODEL_MEDIA_TYPE), None)
        size = next((l.get("size") for l in layers if l.get("mediaType") == MODEL_MEDIA_TYPE), None)
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as e:
        raise OllamaModelNotFound(
            f"Ollama manifest {manifest_path} is unreadable ({e}); re-run `ollama pull {spec}`."
        ) from None
    if digest is None:
        raise OllamaModelNotFound(
            f"Ollama manifest {manifest_path} has no model layer ({MODEL_MEDIA_TYPE}); it is "
            "not a GGUF language model, or the pull is incomplete. Re-run `ollama pull`."
        )
    algo, _, hexdigest = str(digest).partition(":")
    # Current Ollama names blobs sha256-HEX; older versions used sha256:HEX.
    candidates = [root / "blobs" / f"{algo}-{hexdigest}", root / "blobs" / f"{algo}:{hexdigest}"]
    blob = next((c for c in candidates if c.is_file()), None)
    if blob is None:
        raise OllamaModelNotFound(
            f"Ollama model {spec} names blob {digest}, but {candidates[0]} is missing; the store "
            f"is incomplete. Re-run `ollama pull {spec}`."
        )
    if isinstance(size, int) and blob.stat().st_size != size:
        raise OllamaModelNotFound(
            f"Ollama blob {blob} has {blob.stat().st_size} bytes, the manifest says {size}; "
            f"the download is incomplete. Re-run `ollama pull {spec}`."
        )
    return blob
