"""Every MLXGEN_* environment variable, parsed and validated in one place."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import ConfigError

ENV_VARS = {
    "MLXGEN_PREFILL_CHUNK_SIZE": "tokens per prefill chunk: a positive integer, or auto (default: 512 on the CPU, 2048 on a GPU)",
    "MLXGEN_BLAS": "CPU BLAS to preload: auto (default), off, or a library path",
    "MLXGEN_QUANTIZED": "keep or dequantize quantized weights: auto (default; dequantize on CPU), keep, dequantize",
    "MLXGEN_DTYPE": "float dtype for weights: auto (default; float32 on CPU, float16 on GPU), float32, float16, bfloat16",
    "MLXGEN_CACHE_DIR": "where fetched models are cached (default ~/.cache/mlxgen)",
    "MLXGEN_CONVERT_CACHE": "keep each GGUF's converted MLX weights and tokenizer under MLXGEN_CACHE_DIR/converted so later loads skip the repack: on (default) or off (also 1/0)",
    "MLXGEN_CONVERT_CACHE_BYTES": "size cap of the converted-weights cache, least recently used entries evicted first: bytes, or with KB/MB/GB/KiB/MiB/GiB (default 8GiB; the newest entry is always kept)",
    "MLXGEN_CPU_FAST_OPS": "on the CPU, fast softmax/SwiGLU math (mlxgen/backends/cpu/ops.py), read at load: on (default) or off",
    "MLXGEN_CPU_KERNELS": "on the CPU, mlxgen's C++ softmax/SwiGLU/RMSNorm/RoPE/LM-head kernels, built once per machine (mlxgen/backends/cpu/ext.py), read at load: auto (default; MLX ops if the build fails), on (fail instead), off",
    "MLXGEN_KERNELS": "custom Metal kernels: auto (default; only where measured faster), off, on",
    "MLXGEN_LOG_LEVEL": "logging level for the mlxgen logger (default WARNING; the CLI uses INFO)",
    "MLXGEN_CACHE_MODE": "KV cache mode: auto (default: pre-rope where the Metal decode kernel measured faster, else standard), standard (post-RoPE keys, mlx-lm's) or pre-rope",
    "MLXGEN_KV_DTYPE": "KV cache storage dtype of the CPU backend (float32 models), read at load: auto (default: float16 where mlxgen's kernels are built, as Ollama's cache; else float32), float16 or float32; other backends keep the model's dtype",
    "MLXGEN_CACHE_REUSE": "reuse cached K/V (stored chunks, session prefixes): on (default) or off",
    "MLXGEN_RECOMPUTE": "fraction of reused chunk tokens recomputed with full attention, in [0, 1], or auto (default 0.15; 0.2 when every chunk in the prompt was stored after a context)",
    "MLXGEN_CHUNK_STORE_BYTES": "in-memory chunk store limit: bytes, or with KB/MB/GB/KiB/MiB/GiB (default 1GiB)",
    "MLXGEN_SERVER": "URL of a running `mlxgen serve` that `mlxgen generate` sends its requests to (default: none, load in-process)",
}


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


def prefill_chunk_size(override: int | None = None) -> int | None:
    """The requested chunk size, or None for the backend's auto policy (mlxgen/prefill.py)."""
    if override is not None:
        return positive_int(override, "prefill_chunk_size")
    raw = _get("MLXGEN_PREFILL_CHUNK_SIZE")
    if raw is None or raw == "auto":
        return None
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


def cpu_fast_ops(override: str | None = None) -> bool:
    return choice("MLXGEN_CPU_FAST_OPS", override, ("on", "off"), "on") == "on"


def cpu_kernels(override: str | None = None) -> str:
    return choice("MLXGEN_CPU_KERNELS", override, ("auto", "on", "off"), "auto")


def cache_dir() -> Path:
    raw = _get("MLXGEN_CACHE_DIR")
    path = Path(raw).expanduser() if raw else Path.home() / ".cache" / "mlxgen"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"MLXGEN_CACHE_DIR (environment) must be a directory; {path} is a file.")
    return path


def convert_cache(override: bool | None = None) -> bool:
    """Whether GGUF loads use the converted-weights cache (the argument, else MLXGEN_CONVERT_CACHE)."""
    if override is not None:
        if not isinstance(override, bool):
            raise ConfigError(f"cache must be True or False; got {override!r}.")
        return override
    raw = (_get("MLXGEN_CONVERT_CACHE") or "on").lower()
    if raw not in ("on", "off", "1", "0"):
        raise ConfigError(f"MLXGEN_CONVERT_CACHE (environment) must be on, off, 1 or 0; got {raw!r}.")
    return raw in ("on", "1")


# A 7B Q4_K_M converts to about 5 GB: the cap holds that and a few small models, and is a
# predictable number to document; a larger model's entry is still kept when it is the newest.
DEFAULT_CONVERT_CACHE_BYTES = 8 << 30


def convert_cache_bytes() -> int:
    value = _get("MLXGEN_CONVERT_CACHE_BYTES")
    if value is None:
        return DEFAULT_CONVERT_CACHE_BYTES
    return byte_count(value, "MLXGEN_CONVERT_CACHE_BYTES (environment)")


def log_level(default: str = "WARNING") -> str:
    raw = _get("MLXGEN_LOG_LEVEL") or default
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"MLXGEN_LOG_LEVEL (environment) must be DEBUG, INFO, WARNING or ERROR; "
                          f"got {raw!r}.")
    return level


def blas() -> str:
    """MLXGEN_BLAS as _mlxgen_blas.py read it at start-up: auto, off, or an existing file."""
    raw = _get("MLXGEN_BLAS") or "auto"
    if raw.lower() in ("auto", "off", "0", "false", "no", "none") or Path(raw).is_file():
        return raw
    raise ConfigError(f"MLXGEN_BLAS (environment) must be auto, off or the path of a BLAS library "
                      f"file; {raw!r} is not a file.")


def kernels_mode() -> str:
    return choice("MLXGEN_KERNELS", None, ("auto", "off", "on"), "auto")


CACHE_MODES = ("standard", "pre-rope")
# "auto" is faster but measured below this share's quality (bench/NOTES.md, "Reuse frontier"):
# quality first until a setting reaches both. Chunks stored after a context have their own
# default (mlxgen/reuse/recompute.py, CONTEXT_RECOMPUTE).
DEFAULT_RECOMPUTE = 0.15
DEFAULT_CHUNK_STORE_BYTES = 1 << 30
_BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


def cache_mode(override: str | None = None, default: str = "standard") -> str:
    """The argument, else MLXGEN_CACHE_MODE, else `default` (a model's device default)."""
    mode = choice("MLXGEN_CACHE_MODE", override, CACHE_MODES + ("auto",), "auto")
    return default if mode == "auto" else mode


def kv_dtype(override: str | None = None) -> str:
    """The argument, else MLXGEN_KV_DTYPE, else "auto" (the backend decides at load)."""
    return choice("MLXGEN_KV_DTYPE", override, ("auto", "float16", "float32"), "auto")


def cache_reuse(override: bool | None = None) -> bool:
    if override is not None:
        if not isinstance(override, bool):
            raise ConfigError(f"cache_reuse must be True or False; got {override!r}.")
        return override
    return choice("MLXGEN_CACHE_REUSE", None, ("on", "off"), "on") == "on"


def recompute_fraction(override: float | str | None = None,
                       default: float = DEFAULT_RECOMPUTE) -> float | str:
    """Share of reused chunk tokens recomputed with full attention, or "auto" (the tokens are
    chosen by mlxgen/reuse/recompute.py): the argument, else MLXGEN_RECOMPUTE, else `default`
    (the reuse code passes the one for the prompt's chunks)."""
    source = "recompute" if override is not None else "MLXGEN_RECOMPUTE (environment)"
    value = override if override is not None else _get("MLXGEN_RECOMPUTE")
    if value is None:
        return default
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        frac = float(value) if not isinstance(value, bool) else -1.0
    except (TypeError, ValueError):
        frac = -1.0
    if not 0.0 <= frac <= 1.0:  # also rejects NaN
        raise ConfigError(f"{source} must be a fraction in [0, 1] or \"auto\"; got {value!r}.")
    return frac


def chunk_store_bytes(override: int | str | None = None) -> int:
    source = "max_bytes" if override is not None else "MLXGEN_CHUNK_STORE_BYTES (environment)"
    value = override if override is not None else _get("MLXGEN_CHUNK_STORE_BYTES")
    if value is None:
        return DEFAULT_CHUNK_STORE_BYTES
    return byte_count(value, source)


def byte_count(value: int | str, source: str) -> int:
    """A positive byte count from an int or a string such as 512MB or 2GiB."""
    if isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        digits = text.rstrip("KMGIB")
        unit = _BYTE_UNITS.get(text[len(digits):])
        try:
            n = int(float(digits) * unit) if unit and digits else 0
        except (ValueError, OverflowError):
            n = 0
    else:
        n = value if isinstance(value, int) and not isinstance(value, bool) else 0
    if n <= 0:
        raise ConfigError(
            f"{source} must be a positive byte count (e.g. 1073741824, 512MB, 2GiB); got {value!r}."
        )
    return n


def server_url() -> str | None:
    """MLXGEN_SERVER: a running `mlxgen serve` that `mlxgen generate` sends its requests to."""
    url = _get("MLXGEN_SERVER")
    if url is None or not url.strip():
        return None
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"MLXGEN_SERVER must be an http:// or https:// URL; got {url!r}.")
    return url.strip()


def validate_all() -> None:
    """Parse every variable so a malformed value fails early with its name (load and generate
    call this, through mlxgen.backends.check_environment, which also checks what the device must
    support), and apply MLXGEN_LOG_LEVEL to the `mlxgen` logger when it is set."""
    cpu_fast_ops()
    cpu_kernels()
    kernels_mode()
    blas()
    cache_dir()
    prefill_chunk_size()
    quantized_policy()
    dtype_name()
    log_level()
    cache_mode()
    kv_dtype()
    cache_reuse()
    recompute_fraction()
    chunk_store_bytes()
    convert_cache()
    convert_cache_bytes()
    server_url()
    if _get("MLXGEN_LOG_LEVEL") is not None:
        logging.getLogger("mlxgen").setLevel(log_level())
