"""Loaded models: kept warm between requests, evicted least recently used past a memory budget
(the weights' bytes) or when their keep_alive runs out. Loads and unloads happen on the worker
thread (worker.py); other threads only read `describe()`."""

from __future__ import annotations

import gc
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import ConfigError, ModelLoadError
from ..loading import load, pypi
from ..loading.ollama import OllamaModelNotFound
from ..reuse import ChunkStore, model_fingerprint
from .prefix_cache import PrefixCache

log = logging.getLogger("mlxgen")

DEFAULT_KEEP_ALIVE = 300.0  # seconds, as Ollama
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class ModelNotFound(ModelLoadError):
    """The name resolves to no model (HTTP 404); other load failures are server errors."""


def parse_keep_alive(value: Any, default: float = DEFAULT_KEEP_ALIVE) -> float:
    """Ollama's keep_alive in seconds: a number or a Go duration ("5m", "1h30m", "0"); negative
    keeps the model loaded forever (math.inf); None is `default`. Raises ConfigError."""
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)?", body)
        if not parts or "".join(n + u for n, u in parts) != body or (
                len(parts) > 1 and not all(u for _, u in parts)):
            raise ConfigError(f"keep_alive must be seconds or a duration like \"5m\", \"1h\" or "
                              f"\"-1\"; got {value!r}.")
        seconds = sign * sum(float(n) * _UNITS[u or "s"] for n, u in parts)
    else:
        raise ConfigError(f"keep_alive must be seconds or a duration like \"5m\"; got {value!r}.")
    return math.inf if seconds < 0 else seconds


def resolve_source(name: str) -> str:
    """The load() source for a model name: as load() takes it, except that an Ollama-style
    NAME[:TAG] that is neither a file nor a PyPI-shipped model is looked up in Ollama's store."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("model must be a non-empty string (e.g. \"smollm2:135m\").")
    if (name.startswith("ollama:") or pypi.resolve_name(name) or Path(name).expanduser().exists()
            or name.endswith(".gguf") or name.count("/") == 1):
        return name
    if re.fullmatch(r"[\w.\-]+(:[\w.\-]+)?", name):
        return "ollama:" + name
    return name


@dataclass
class Loaded:
    name: str
    model: Any
    tokenizer: Any
    nbytes: int
    fingerprint: str
    load_s: float
    keep_alive: float = DEFAULT_KEEP_ALIVE  # seconds; math.inf: forever
    expires_at: float = math.inf  # monotonic seconds
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0
    chunks: ChunkStore | None = None


class ModelPool:
    def __init__(self, max_memory: int | None, prefix_cache: PrefixCache,
                 chunk_memory: int | None = None, default_keep_alive: float = DEFAULT_KEEP_ALIVE):
        self.max_memory = max_memory
        self.prefix_cache = prefix_cache
        self.chunk_memory = chunk_memory
        self.default_keep_alive = default_keep_alive
        self._models: dict[str, Loaded] = {}
        self._lock = threading.Lock()

    def acquire(self, name: str) -> tuple[Loaded, float]:
        """The loaded model for `name` (loading it if needed) and the seconds the load took."""
        with self._lock:
            entry = self._models.get(name)
        loaded_now = entry is None
        if loaded_now:
            entry = self._load(name)
        entry.busy += 1
        entry.last_used = time.monotonic()
        return entry, entry.load_s if loaded_now else 0.0

    def _load(self, name: str) -> Loaded:
        source = resolve_source(name)
        start = time.perf_counter()
        try:
            model, tokenizer = load(source)
        except OllamaModelNotFound as e:
            raise ModelNotFound(f"model {name!r} not found: {e}") from None
        except ModelLoadError as e:
            if "not found" in str(e) or "does not exist" in str(e):
                raise ModelNotFound(f"model {name!r} not found: {e}") from None
            raise
        nbytes = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
        entry = Loaded(name, model, tokenizer, nbytes, model_fingerprint(model),
                       time.perf_counter() - start, self.default_keep_alive)
        with self._lock:
            self._models[name] = entry
        self._evict_over_budget(keep=entry)
        log.info("loaded %s (%.2f GB of weights) in %.2f s", name, nbytes / 1e9, entry.load_s)
        return entry

    def release(self, entry: Loaded, keep_alive: float) -> None:
        """A request is done with `entry`: its keep_alive starts now (0 unloads it now)."""
        entry.busy -= 1
        entry.last_used = time.monotonic()
        entry.keep_alive = keep_alive
        entry.expires_at = entry.last_used + keep_alive
        self.expire()

    def expire(self) -> None:
        now = time.monotonic()
        for entry in list(self._models.values()):
            if entry.busy == 0 and entry.expires_at <= now:
                self.unload(entry.name)

    def unload(self, name: str) -> bool:
        with self._lock:
            entry = self._models.pop(name, None)
        if entry is None:
            return False
        if not any(e.fingerprint == entry.fingerprint for e in self._models.values()):
            self.prefix_cache.drop(entry.fingerprint)
        del entry
        gc.collect()
        mx.clear_cache()
        log.info("unloaded %s", name)
        return True

    def chunk_store(self, entry: Loaded) -> ChunkStore:
        if entry.chunks is None:
            entry.chunks = ChunkStore(entry.model, entry.tokenizer, max_bytes=self.chunk_memory)
        return entry.chunks

    def _evict_over_budget(self, keep: Loaded) -> None:
        if self.max_memory is None:
            return
        while True:
            with self._lock:
                total = sum(e.nbytes for e in self._models.values())
                idle = sorted((e for e in self._models.values() if e is not keep and e.busy == 0),
                              key=lambda e: e.last_used)
            if total <= self.max_memory or not idle:
                break
            self.unload(idle[0].name)
        if keep.nbytes > self.max_memory:
            log.warning("%s alone (%.2f GB) exceeds --max-memory; kept loaded while in use",
                        keep.name, keep.nbytes / 1e9)

    def loaded(self) -> list[Loaded]:
        with self._lock:
            return list(self._models.values())
