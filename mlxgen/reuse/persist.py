"""On-disk chunks: one safetensors file per chunk plus a store manifest.

A chunk file holds `keys`, `values` (layers, kv_heads, n, head_dim) and `token_ids`, with
metadata: format, format version, model fingerprint, dtype, token count and a sha256 of the three
tensors. Loading checks all of them, so a truncated or corrupt file, another format version or
another model's file is reported, never served. Files are written to a temporary name and renamed,
so a crash mid-write leaves no half file under a chunk's name."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import mlx.core as mx

from ..errors import ChunkStoreError, CorruptChunkError
from .fingerprint import array_bytes

FORMAT = "mlxgen-chunk"
FORMAT_VERSION = "1"
MANIFEST = "store.json"


def checksum(arrays: Sequence[mx.array]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(array_bytes(a))
    return h.hexdigest()


def save_chunk(
    file: Path, keys: mx.array, values: mx.array, token_ids: Sequence[int], fingerprint: str
) -> None:
    ids = mx.array(list(token_ids), dtype=mx.int32)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "dtype": str(keys.dtype).removeprefix("mlx.core."),
        "n_tokens": str(len(token_ids)),
        "sha256": checksum([keys, values, ids]),
    }
    tmp = file.with_name(f".{file.stem}.{os.getpid()}.tmp.safetensors")
    mx.save_safetensors(str(tmp), {"keys": keys, "values": values, "token_ids": ids}, metadata)
    os.replace(tmp, file)


def load_chunk(
    file: Path, fingerprint: str, token_ids: Sequence[int], shape: tuple[int, int, int],
    dtype: mx.Dtype,
) -> tuple[mx.array, mx.array]:
    """(keys, values) of a chunk file, after checking it is intact and is this model's chunk
    for exactly these tokens. shape: (layers, kv_heads, head_dim) of the model."""

    def corrupt(why: str) -> CorruptChunkError:
        return CorruptChunkError(f"chunk file {file} {why}; delete it and the chunk is re-encoded.")

    try:
        arrays, meta = mx.load(str(file), return_metadata=True)
        arrays = dict(arrays)
        mx.eval(list(arrays.values()))
    except Exception as e:  # noqa: BLE001 - MLX reports truncation, bad headers as various errors
        raise corrupt(f"cannot be read ({type(e).__name__}: {e}): it is truncated or corrupt"
                      ) from None
    if meta.get("format") != FORMAT:
        raise corrupt("is not an mlxgen chunk file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise corrupt(f"has format version {meta.get('format_version')!r}; this mlxgen reads "
                      f"version {FORMAT_VERSION}")
    if meta.get("fingerprint") != fingerprint:
        raise ChunkStoreError(
            f"chunk file {file} was encoded by another model (fingerprint "
            f"{meta.get('fingerprint')}, this model's is {fingerprint}); its K/V mean nothing to "
            "this model. Keep one store directory per model."
        )
    if set(arrays) != {"keys", "values", "token_ids"}:
        raise corrupt(f"holds tensors {sorted(arrays)}, expected keys, values, token_ids")
    keys, values, ids = arrays["keys"], arrays["values"], arrays["token_ids"]
    layers, kv_heads, head_dim = shape
    want = (layers, kv_heads, len(token_ids), head_dim)
    if tuple(keys.shape) != want or tuple(values.shape[:3]) != want[:3]:
        raise corrupt(f"has K/V of shape {tuple(keys.shape)}, expected {want}")
    if keys.dtype != dtype or values.dtype != dtype:
        raise corrupt(f"holds {keys.dtype} K/V but the model computes in {dtype}")
    if ids.tolist() != list(token_ids):
        raise corrupt("holds other token ids than its name says")
    if checksum([keys, values, ids]) != meta.get("sha256"):
        raise corrupt("fails its checksum (the data was damaged)")
    return keys, values


def open_store_dir(path: Path, fingerprint: str, model_type: str) -> None:
    """Create the store directory, or check that an existing one belongs to this model."""
    path.mkdir(parents=True, exist_ok=True)
    manifest = path / MANIFEST
    if manifest.exists():
        try:
            info = json.loads(manifest.read_text())
            theirs = info["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CorruptChunkError(
                f"{manifest} is not a valid chunk-store manifest; delete the directory or pick "
                "another path."
            ) from None
        if theirs != fingerprint:
            raise ChunkStoreError(
                f"the chunk store at {path} holds chunks of another model "
                f"({info.get('model_type')}, fingerprint {theirs}); this model ({model_type}) has "
                f"fingerprint {fingerprint}. Use one store path per model."
            )
        return
    tmp = manifest.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": "mlxgen-chunk-store", "format_version": FORMAT_VERSION,
                               "fingerprint": fingerprint, "model_type": model_type}))
    os.replace(tmp, manifest)
