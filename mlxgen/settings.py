"""Every MLXGEN_* environment variable, parsed and validated in one place."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

ENV_VARS = {
    "MLXGEN_PREFILL_CHUNK_SIZE": "tokens per prefill chunk (positive integer; default 512)",
    "MLXGEN_BLAS": "CPU BLAS to preload: auto (default), off, or a library path",
    "MLXGEN_QUANTIZED": "keep or dequantize quantized weights: auto (default; dequantize on CPU), keep, dequantize",
    "MLXGEN_DTYPE": "float dtype for weights: auto (default; float32 on CPU, float16 on GPU), float32, float16, bfloat16",
    "MLXGEN_CACHE_DIR": "where fetched models are cached (default ~/.cache/mlxgen)",
    "MLXGEN_LOG_LEVEL": "logging level for the mlxgen logger (default WARNING; the CLI uses INFO)",
}

DEFAULT_PREFILL_CHUNK_SIZE = 512


def _get(name: str) -> str | None:
    value = os.environ.get(name)
    return value.strip() if value is not None and value.strip() != "" else None


def positive_int(value, what: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n <= 0 or (isinstance(value, float) and value != n):
        raise ConfigError(f"{what} must be a positive integer, got {value!r}.")
    return n


def prefill_chunk_size(override: int | None = None) -> int:
    if override is not None:
        return positive_int(override, "prefill_chunk_size")
    raw = _get("MLXGEN_PREFILL_CHUNK_SIZE")
    if raw is None:
        return DEFAULT_PREFILL_CHUNK_SIZE
    return positive_int(raw, "MLXGEN_PREFILL_CHUNK_SIZE (environment)")


def choice(name: str, override: str | None, allowed: tuple[str, ...], default: str) -> str:
    source = "argument" if override is not None else f"{name} (environment)"
    value = override if override is not None else (_get(name) or default)
    if value not in allowed:
        raise ConfigError(f"{source} must be one of {', '.join(allowed)}; got {value!r}.")
    return value


def quantized_policy(override: str | None = None) -> str:
    return choice("MLXGEN_QUANTIZED", override, ("auto", "keep", "dequantize"), "auto")


def dtype_name(override: str | None = None) -> str:
    return choice("MLXGEN_DTYPE", override, ("auto", "float32", "float16", "bfloat16"), "auto")


def cache_dir() -> Path:
    raw = _get("MLXGEN_CACHE_DIR")
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "mlxgen"


def log_level(default: str = "WARNING") -> str:
    level = (_get("MLXGEN_LOG_LEVEL") or default).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"MLXGEN_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR; got {level!r}.")
    return level


def validate_all() -> None:
    """Parse every variable once so a malformed value fails early with its name."""
    prefill_chunk_size()
    quantized_policy()
    dtype_name()
    log_level()
