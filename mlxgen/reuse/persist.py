"""On-disk chunks: one safetensors file per chunk plus a store manifest and a store key.

A chunk file holds `keys`, `values` (layers, kv_heads, n, head_dim) and `token_ids`, with
metadata: format, format version, model fingerprint, dtype, token count and an HMAC-SHA256 of all
of these under the store's key (`store.key`, 32 random bytes, mode 0600). Loading checks every
one, so a truncated, corrupt or forged file (written by anyone who lacks the key), another format
version or another model's file is reported, never served. Stores are created 0700, files 0600.
Files are written to a temporary name and renamed, so a crash mid-write leaves no half file under
a chunk's name; temporaries of dead writers are removed when the store is opened."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Sequence

import mlx.core as mx

from .. import trust
from ..errors import ChunkStoreError, CorruptChunkError
from .fingerprint import array_bytes

FORMAT = "mlxgen-chunk"
FORMAT_VERSION = "2"  # 2: HMAC under the store key (1: unkeyed sha256, refused and re-encoded)
MANIFEST = "store.json"
KEY_FILE = "store.key"
_TMP = re.compile(r"\..*\.(\d+)\.tmp(\.safetensors)?$")
STALE_TMP_S = 24 * 3600  # a temporary this old is dead even if its pid was reused


def tag(key: bytes, meta: dict[str, str], arrays: Sequence[mx.array]) -> str:
    """HMAC-SHA256 of the metadata fields and the tensors' bytes."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    for name in ("format", "format_version", "fingerprint", "dtype", "n_tokens"):
        h.update(f"{name}={meta.get(name)}\n".encode())
    for a in arrays:
        h.update(array_bytes(a))
    return h.hexdigest()


def save_chunk(
    file: Path, keys: mx.array, values: mx.array, token_ids: Sequence[int], fingerprint: str,
    key: bytes,
) -> None:
    ids = mx.array(list(token_ids), dtype=mx.int32)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "dtype": str(keys.dtype).removeprefix("mlx.core."),
        "n_tokens": str(len(token_ids)),
    }
    metadata["hmac"] = tag(key, metadata, [keys, values, ids])
    tmp = file.with_name(f".{file.stem}.{os.getpid()}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), {"keys": keys, "values": values, "token_ids": ids}, metadata)
        os.chmod(tmp, 0o600)
        os.replace(tmp, file)
    except (OSError, RuntimeError) as e:  # MLX reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise ChunkStoreError(f"cannot write chunk file {file} ({e}).") from None


class ForeignChunkError(ChunkStoreError):
    """A chunk file of another model (or another store) found under this store's chunk name."""


def load_chunk(
    file: Path, fingerprint: str, token_ids: Sequence[int], shape: tuple[int, int, int],
    dtype: mx.Dtype, key: bytes,
) -> tuple[mx.array, mx.array]:
    """(keys, values) of a chunk file, after checking it is intact, written by a holder of this
    store's key, and this model's chunk for exactly these tokens. shape: (layers, kv_heads,
    head_dim) of the model."""

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
        raise ForeignChunkError(
            f"chunk file {file} was encoded by another model or after another context "
            f"(fingerprint {meta.get('fingerprint')}, this chunk's is {fingerprint}); its K/V "
            "mean nothing here. Keep one store directory per model."
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
    if not hmac.compare_digest(tag(key, meta, [keys, values, ids]), str(meta.get("hmac"))):
        raise corrupt("fails authentication with this store's key (damaged, or written by "
                      "someone without the key)")
    return keys, values


def open_store_dir(path: Path, fingerprint: str, model_type: str) -> bytes:
    """Create the store directory (0700), or check that an existing one belongs to this model
    and can be written; remove dead writers' temporaries. Returns the store's HMAC key."""
    if str(path) in ("", "."):
        raise ChunkStoreError("ChunkStore path is empty; give a directory (or path=None to keep "
                              "chunks in memory only).")
    if path.exists() and not path.is_dir():
        raise ChunkStoreError(f"ChunkStore path {path} is a file, not a directory; give a "
                              "directory.")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ChunkStoreError(f"cannot create the chunk store directory {path} ({e}).") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ChunkStoreError(f"the chunk store directory {path} is not writable; chunks could "
                              "not be saved. Use a writable directory, or path=None.")
    _remove_stale_temporaries(path)
    manifest = path / MANIFEST
    if manifest.exists():
        try:
            info = json.loads(manifest.read_text())
            theirs = info["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
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
        return store_key(path)
    tmp = manifest.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": "mlxgen-chunk-store", "format_version": FORMAT_VERSION,
                               "fingerprint": fingerprint, "model_type": model_type}))
    os.chmod(tmp, 0o600)
    os.replace(tmp, manifest)
    return store_key(path)


def store_key(path: Path) -> bytes:
    """The store's HMAC key, created (0600) on first use; refused if others could read or write it."""
    file = path / KEY_FILE
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    reason = trust.check_private_file(file)
    if reason is not None:
        raise ChunkStoreError(f"the chunk store key {file} is not private: {reason}. Anyone who "
                              "can read or replace it can forge chunks; delete it (its chunks are "
                              "then re-encoded) and make the directory private.")
    key = file.read_bytes()
    if len(key) != 32:
        raise ChunkStoreError(f"the chunk store key {file} is damaged ({len(key)} bytes, expected "
                              "32); delete it and its chunks are re-encoded.")
    return key


def _remove_stale_temporaries(path: Path) -> None:
    for tmp in path.glob(".*.tmp*"):
        m = _TMP.match(tmp.name)
        if m is None:
            continue
        try:
            old = time.time() - tmp.stat().st_mtime > STALE_TMP_S
        except OSError:
            continue
        if old or not _alive(int(m.group(1))):
            tmp.unlink(missing_ok=True)
    for tmp in path.glob("store.*.tmp"):  # store.<pid>.tmp from a manifest write
        pid = tmp.name.split(".")[1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or a nonsense pid): leave its file alone
    return True
