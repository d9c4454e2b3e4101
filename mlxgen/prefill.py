"""Lazy-graph chunked prefill: build one chunk's graph, evaluate only the cache state, go on.

Logits are computed for the last prompt token only; earlier chunks never touch the LM head."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx

from . import settings
from .backends.device import is_cpu
from .runtime import CPU_CHUNK, GPU_CHUNK


def chunk_size_for(model, override: int | None = None) -> int:
    """The argument, else MLXGEN_PREFILL_CHUNK_SIZE, else the size chosen for the model at load
    (mlxgen/runtime.py), else the device's default."""
    return (settings.prefill_chunk_size(override) or model.runtime.prefill_chunk_size
            or (CPU_CHUNK if is_cpu() else GPU_CHUNK))


def cache_state(cache: list) -> list[mx.array]:
    return [a for layer in cache for a in layer.state]


def prefill(
    model, tokens: Sequence[int] | mx.array, cache: list, chunk_size: int | None = None
) -> mx.array:
    """Run `tokens` through the model into `cache`; return the last position's logits (1, vocab)."""
    chunk = chunk_size_for(model, chunk_size)
    clear = model.runtime.clear_cache_between_chunks
    tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
    if tokens.ndim != 1 or tokens.size == 0:
        raise ValueError("prefill needs a non-empty 1-D sequence of token ids.")
    start, n = 0, tokens.size
    for layer in cache:  # storage for the whole prompt at once (a decode step's growth too)
        layer.reserve(n + 1)
    while n - start > chunk:
        model.model(tokens[None, start : start + chunk], cache)  # hidden states are discarded
        # Evaluate asynchronously: building the next chunk's graph overlaps this evaluation.
        mx.async_eval(cache_state(cache))
        if clear:  # a GPU's buffer cache would otherwise grow with every chunk (as mlx-lm)
            mx.clear_cache()
        start += chunk
    return model(tokens[None, start:], cache, last_only=True)[:, -1, :]
