"""Lazy-graph chunked prefill: build one chunk's graph, evaluate only the cache state, go on.

Logits are computed for the last prompt token only; earlier chunks never touch the LM head."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx

from . import backend, settings

# Auto policy. CPU: attention is blocked inside each chunk (cpu_ops), so bigger chunks only
# trade matmul efficiency against per-chunk work; 512 measured best (bench/NOTES.md). GPU:
# mlx-lm's 2048 until measured on a Mac.
CPU_CHUNK, GPU_CHUNK = 512, 2048


def chunk_size_for(override: int | None = None) -> int:
    """The argument, else MLXGEN_PREFILL_CHUNK_SIZE, else the backend's auto policy."""
    return settings.prefill_chunk_size(override) or (CPU_CHUNK if backend.is_cpu() else GPU_CHUNK)


def cache_state(cache: list) -> list[mx.array]:
    return [a for layer in cache for a in layer.state]


def prefill(
    model, tokens: Sequence[int] | mx.array, cache: list, chunk_size: int | None = None
) -> mx.array:
    """Run `tokens` through the model into `cache`; return the last position's logits (1, vocab)."""
    chunk = chunk_size_for(chunk_size)
    tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
    if tokens.ndim != 1 or tokens.size == 0:
        raise ValueError("prefill needs a non-empty 1-D sequence of token ids.")
    start, n = 0, tokens.size
    while n - start > chunk:
        model.model(tokens[None, start : start + chunk], cache)  # hidden states are discarded
        # Evaluate asynchronously: building the next chunk's graph overlaps this evaluation.
        mx.async_eval(cache_state(cache))
        start += chunk
    return model(tokens[None, start:], cache, last_only=True)[:, -1, :]
