"""mlxgen: fast time-to-first-token LLM inference on MLX (Apple Silicon first, CPU fallback)."""

from .errors import (
    ChunkStoreError, ConfigError, CorruptChunkError, MlxgenError, ModelLoadError, PromptTooLongError,
)
from .generate import GenerationResponse, GenerationStats, generate, stream_generate
from .loading import build_model, load
from .reuse import Chunk, ChunkStore
from .reuse.session import Session
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = [
    "load", "generate", "stream_generate", "build_model", "Tokenizer",
    "Session", "ChunkStore", "Chunk",
    "GenerationResponse", "GenerationStats",
    "MlxgenError", "ModelLoadError", "ConfigError", "PromptTooLongError", "ChunkStoreError",
    "CorruptChunkError",
]
