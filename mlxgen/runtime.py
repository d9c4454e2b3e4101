"""How a loaded model runs on this machine: decided once, at load, by mlxgen/backends, and read
by prefill, generation and cache construction. Plain data: no policy lives here."""

from __future__ import annotations

from dataclasses import dataclass

# Prefill tokens per chunk. CPU: attention is blocked inside each chunk, so bigger chunks only
# trade matmul efficiency against per-chunk work (measured, bench/NOTES.md). GPU: mlx-lm's
# default until measured on a Mac.
CPU_CHUNK, GPU_CHUNK = 512, 2048


@dataclass(frozen=True)
class Runtime:
    # "cpu": mlxgen's CPU ops and kernels; "metal": MLX's ops plus our Metal kernels where they
    # measured faster; "mlx": MLX's own ops only (CUDA, or a GPU profile run on the CPU).
    backend: str = "mlx"
    prefill_chunk_size: int | None = None  # None: CPU_CHUNK or GPU_CHUNK by device (prefill.py)
    cache_mode: str = "standard"  # the default when neither the caller nor the environment says
    kv_dtype: str | None = None  # the KV cache's storage dtype name (None: the keys' own dtype)
    clear_cache_between_chunks: bool = False  # free MLX's buffer cache after each prefill chunk
    wired_limit: bool = False  # wire the model's memory while generating (Metal)
