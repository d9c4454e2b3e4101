"""mlxgen: fast time-to-first-token LLM inference on MLX (Apple Silicon first, CPU fallback)."""

from .backend import report_blas as _report_blas
from .errors import ConfigError, MlxgenError, ModelLoadError, PromptTooLongError
from .generate import GenerationResponse, GenerationStats, generate, stream_generate
from .loading import build_model, load
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = [
    "load", "generate", "stream_generate", "build_model", "Tokenizer",
    "GenerationResponse", "GenerationStats",
    "MlxgenError", "ModelLoadError", "ConfigError", "PromptTooLongError",
]
_report_blas()
