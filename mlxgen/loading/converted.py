"""The converted-weights cache: what a GGUF load computes (MLX arrays, config, tokenizer), kept on
disk so later loads of the same file read it instead of parsing the header, building the
tokenizer from its merges and repacking every block.

An entry lives in `<MLXGEN_CACHE_DIR>/converted/<key>/`: `weights.safetensors` (mx.save_safetensors,
read back lazily by mx.load), `tokenizer.json` (tokenizers' own serialization) and
`manifest.json` (config, quantization, tokenizer settings, metadata, and what the entry was made
from). The key hashes the file's realpath, size, mtime_ns and inode, the converter version (this
package's converter sources, MLX's and tokenizers' versions) and the conversion options; the
manifest also holds a hash of the GGUF header bytes and of sampled data blocks, checked against
the file on every read, so a file rewritten in place with a forged mtime is not served stale.

Entries are written on a background thread (the load that converted returns first; a later load
of the same entry in this process, clear() and interpreter exit wait for it), to a temporary
directory renamed into place (never read half-written);
a manifest whose checksum, file sizes or tensor list do not match is rebuilt with one log line.
The weights' data bytes are not checksummed on read (that would cost what the load saves): the
sizes and the safetensors header are. The cache is bounded: least recently used entries are
evicted past MLXGEN_CONVERT_CACHE_BYTES (the entry just written always stays)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import mlx.core as mx

from .. import settings
from .gguf_tokenizer import TokenizerParts

if TYPE_CHECKING:  # the gguf package's import is a cost a cached load need not pay
    from .gguf import GGUFContents

logger = logging.getLogger(__name__)

FORMAT = 1
WEIGHTS, TOKENIZER, MANIFEST = "weights.safetensors", "tokenizer.json", "manifest.json"
# the modules whose code decides what a conversion produces
_CONVERTER_SOURCES = ("gguf.py", "gguf_header.py", "gguf_quants.py", "gguf_tokenizer.py",
                      "converted.py")
_SAMPLES, _SAMPLE_BYTES = 16, 4096
_STALE_SECONDS = 3600  # a temporary directory this old belongs to a writer that died


@cache
def converter_version() -> str:
    """Changes whenever the converter's code or the libraries that write the entry change."""
    import tokenizers

    h = hashlib.sha256(f"{FORMAT} {mx.__version__} {tokenizers.__version__}".encode())
    here = Path(__file__).parent
    for name in _CONVERTER_SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def root() -> Path:
    return settings.cache_dir() / "converted"


def _identity(path: Path) -> dict:
    real = os.path.realpath(path)
    st = os.stat(real)
    return {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _fingerprint(path: str, header_bytes: int, size: int) -> dict:
    """Hashes of the header bytes and of evenly spaced blocks of the tensor data."""
    with open(path, "rb") as f:
        header = hashlib.blake2b(f.read(header_bytes), digest_size=16).hexdigest()
        samples = hashlib.blake2b(digest_size=16)
        span = max(0, size - header_bytes - _SAMPLE_BYTES)
        for i in range(_SAMPLES):
            f.seek(header_bytes + span * i // (_SAMPLES - 1))
            samples.update(f.read(_SAMPLE_BYTES))
    return {"header_bytes": header_bytes, "header_hash": header, "sample_hash": samples.hexdigest()}


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class InThread:
    """fn() on a thread of its own, started by go(); result() waits for it and raises what it
    raised. The thread waits for go() so that start() does not: a function that holds the GIL
    (tokenizers' parser does, for most of its run) would block start() until it returned."""

    def __init__(self, fn: Callable[[], TokenizerParts]):
        self._value: TokenizerParts | None = None
        self._error: BaseException | None = None
        self._go = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn,), name="mlxgen-tokenizer",
                                        daemon=True)
        self._thread.start()

    def go(self) -> None:
        self._go.set()

    def _run(self, fn: Callable[[], TokenizerParts]) -> None:
        self._go.wait()
        try:
            self._value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the result
            self._error = e

    def result(self) -> TokenizerParts:
        self.go()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


@dataclass
class Converted:
    """A cached conversion: the fields of gguf.GGUFContents that a load uses (the tokenizer
    still being built on a thread of its own)."""

    config: dict
    weights: dict[str, mx.array]
    quantization: dict | None
    tokenizer: InThread
    metadata: dict


class Entry:
    """The cache entry of one GGUF file under one set of conversion options."""

    def __init__(self, path: str | os.PathLike, options: dict):
        self.source = _identity(Path(path))
        self.options = {k: str(v) for k, v in sorted(options.items())}
        key = json.dumps([self.source, self.options, converter_version()], sort_keys=True)
        self.key = hashlib.sha256(key.encode()).hexdigest()[:24]
        self.dir = root() / self.key

    def read(self) -> Converted | None:
        """The cached conversion, or None (no entry, a stale one, or a corrupt one: logged).
        A write of this entry still under way in this process is waited for first."""
        _join(_writers.get(self.key))
        if not (self.dir / MANIFEST).is_file():
            return None
        try:
            return self._read()
        except _Stale as e:
            logger.info("converted cache: %s changed (%s); converting it again",
                        self.source["path"], e)
        except Exception as e:  # noqa: BLE001 - any damage means: convert again
            logger.warning("converted cache entry %s is unreadable (%s: %s); rebuilding it",
                           self.dir, type(e).__name__, e)
        return None

    def _read(self) -> Converted:
        manifest = json.loads((self.dir / MANIFEST).read_text())
        body = manifest["body"]
        if manifest["checksum"] != _checksum(body):
            raise ValueError("manifest checksum mismatch")
        if (body["format"], body["converter"], body["source"], body["options"]) != (
                FORMAT, converter_version(), self.source, self.options):
            raise ValueError("manifest is for another file, converter or options")
        for name, size in body["files"].items():
            if os.path.getsize(self.dir / name) != size:
                raise ValueError(f"{name} has the wrong size (truncated?)")
        fp = body["fingerprint"]
        if _fingerprint(self.source["path"], fp["header_bytes"], self.source["size"]) != fp:
            raise _Stale("its header or data blocks differ from when it was converted")
        text = (self.dir / TOKENIZER).read_bytes()
        if hashlib.sha256(text).hexdigest() != body["tokenizer_sha256"]:
            raise ValueError("tokenizer.json checksum mismatch")
        from tokenizers import Tokenizer

        weights, meta = mx.load(str(self.dir / WEIGHTS), return_metadata=True)
        if meta.get("mlxgen_entry") != body["entry"]:
            raise ValueError("weights file belongs to another entry")
        tensors = {k: [str(v.dtype), list(v.shape)] for k, v in weights.items()}
        if tensors != body["tensors"]:
            raise ValueError("weights file holds other tensors than the manifest lists")
        # The tokenizer is parsed on a thread while MLX reads the weights: MLX's read (which
        # async_eval does in the call) releases the GIL, tokenizers' parser holds it.
        tk = body["tokenizer"]
        parts = InThread(lambda: TokenizerParts(Tokenizer.from_str(text.decode()), tk["chat_template"],
                                                tk["bos_token_id"], tk["eos_token_ids"], tk["add_bos_token"]))
        arrays = list(weights.values())
        parts.go()
        mx.async_eval(arrays)
        _touch(self.dir / MANIFEST)
        return Converted(body["config"], weights, body["quantization"], parts, body["metadata"])

    def write_in_background(self, contents: "GGUFContents") -> None:
        """write() on a thread, so the load returns before the entry's bytes reach the disk.
        The thread is not a daemon: the interpreter waits for it at exit (wait_for_writes())."""
        _join(_writers.get(self.key))  # one writer per entry in this process
        try:  # the file as it was converted, before the caller can change it
            fingerprint = _fingerprint(self.source["path"], contents.header_bytes,
                                       self.source["size"])
        except OSError:
            return
        mx.eval(list(contents.weights.values()))  # a new thread has no MLX stream to run them on
        thread = threading.Thread(target=self.write, args=(contents, fingerprint), daemon=False,
                                  name=f"mlxgen-cache-write-{self.key[:8]}")
        _writers[self.key] = thread
        thread.start()

    def write(self, contents: "GGUFContents", fingerprint: dict | None = None) -> None:
        """Store a conversion (atomically), then evict past the size cap. Never raises: a cache
        that cannot be written only costs the next load its conversion. fingerprint: the
        file's, taken when it was converted (default: now)."""
        try:
            if _identity(Path(self.source["path"])) != self.source:
                return  # the file changed while it was read: what we hold may not match it
            fingerprint = fingerprint or _fingerprint(self.source["path"], contents.header_bytes,
                                                      self.source["size"])
            self._write(contents, fingerprint)
            evict(settings.convert_cache_bytes(), keep=self.key)
        except Exception as e:  # noqa: BLE001
            logger.warning("converted cache: could not store %s in %s (%s: %s); later loads "
                           "convert it again", self.source["path"], root(), type(e).__name__, e)

    def _write(self, contents: "GGUFContents", fingerprint: dict) -> None:
        root().mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex  # written into both files: ties the weights to this manifest
        tmp = root() / f".tmp-{self.key}-{os.getpid()}-{token[:8]}"
        tmp.mkdir()
        try:
            parts = contents.tokenizer
            text = parts.tokenizer.to_str().encode()
            (tmp / TOKENIZER).write_bytes(text)
            mx.save_safetensors(str(tmp / WEIGHTS), contents.weights, {"mlxgen_entry": token})
            body = {
                "format": FORMAT, "converter": converter_version(), "source": self.source,
                "options": self.options, "entry": token,
                "fingerprint": fingerprint,
                "files": {TOKENIZER: len(text), WEIGHTS: os.path.getsize(tmp / WEIGHTS)},
                "tensors": {k: [str(v.dtype), list(v.shape)] for k, v in contents.weights.items()},
                "config": contents.config, "quantization": contents.quantization,
                "metadata": contents.metadata, "tokenizer_sha256": hashlib.sha256(text).hexdigest(),
                "tokenizer": {"chat_template": parts.chat_template,
                              "bos_token_id": parts.bos_token_id,
                              "eos_token_ids": list(parts.eos_token_ids),
                              "add_bos_token": parts.add_bos_token},
            }
            manifest = json.dumps({"checksum": _checksum(body), "body": body})
            (tmp / MANIFEST).write_text(manifest)
            _publish(tmp, self.dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


_writers: dict[str, threading.Thread] = {}  # entry key -> its latest background writer


def _join(thread: threading.Thread | None) -> None:
    if thread is not None and thread is not threading.current_thread():
        thread.join()


def wait_for_writes() -> None:
    """Wait until every entry this process is writing in the background is on disk (or
    failed, with its warning logged)."""
    for thread in list(_writers.values()):
        _join(thread)


def _publish(tmp: Path, final: Path) -> None:
    """Rename a complete entry into place. An existing entry (unreadable, or stale) is moved
    aside first; if another process published the same entry meanwhile, its copy stays."""
    if final.exists():
        trash = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        try:
            final.rename(trash)
        except OSError:
            pass  # gone already, or being replaced by another writer
        shutil.rmtree(trash, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:  # another writer's entry is there now: equally good
        pass


def _touch(manifest: Path) -> None:
    try:
        os.utime(manifest)  # its mtime is the entry's last use, for eviction
    except OSError:
        pass


def entries() -> list[tuple[Path, int, float]]:
    """(directory, bytes, last use) of every entry, oldest use first."""
    found = []
    if not root().is_dir():
        return found
    for d in root().iterdir():
        if d.name.startswith("."):
            continue
        try:
            size = sum(f.stat().st_size for f in d.iterdir())
            used = (d / MANIFEST).stat().st_mtime if (d / MANIFEST).exists() else d.stat().st_mtime
        except OSError:
            continue
        found.append((d, size, used))
    return sorted(found, key=lambda e: e[2])


def evict(cap: int, keep: str | None = None) -> list[Path]:
    """Remove least recently used entries until the rest fit in cap bytes (never `keep`), and
    temporary directories left by writers that died. Returns the entries removed."""
    now = time.time()
    for d in root().glob(".*"):
        try:
            if now - d.stat().st_mtime > _STALE_SECONDS or d.name.startswith(".old-"):
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass
    found = entries()
    total, removed = sum(e[1] for e in found), []
    for d, size, _ in found:
        if total <= cap:
            break
        if d.name == keep:
            continue
        shutil.rmtree(d, ignore_errors=True)
        total -= size
        removed.append(d)
    return removed


def clear() -> None:
    """Remove the whole converted-weights cache (after this process's pending writes)."""
    wait_for_writes()
    shutil.rmtree(root(), ignore_errors=True)


class _Stale(Exception):
    """The source file differs from the one the entry was converted from."""
