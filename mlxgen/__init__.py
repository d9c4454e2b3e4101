"""mlxgen: fast time-to-first-token LLM inference on MLX (Apple Silicon first, CPU fallback)."""

from __future__ import annotations

from .errors import (
    ChunkStoreError, ConfigError, CorruptChunkError, MlxgenError, ModelLoadError, PromptTooLongError,
)
from .generate import GenerationResponse, GenerationStats, generate, stream_generate
from .loading import build_model, load
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = [
    "load", "generate", "stream_generate", "build_model", "Tokenizer",
    "Session", "ChunkStore", "Chunk",
    "GenerationResponse", "GenerationStats",
    "MlxgenError", "ModelLoadError", "ConfigError", "PromptTooLongError", "ChunkStoreError",
    "CorruptChunkError",
]

# K/V reuse is imported on first use: `load` + `generate` need none of it (a fresh process's
# import is part of its time to first token).
_LAZY = {"Chunk": "mlxgen.reuse", "ChunkStore": "mlxgen.reuse", "Session": "mlxgen.reuse.session"}


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name == "reuse":  # `mlxgen.reuse.X` after a bare `import mlxgen`, as before
        return importlib.import_module("mlxgen.reuse")
    raise AttributeError(f"module 'mlxgen' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
