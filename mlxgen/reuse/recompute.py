"""Selective recompute: give some reused chunk tokens full attention to what precedes them.

A chunk encoded alone misses attention to the text before it. Recomputing a few of its tokens
through every layer, attending to everything before them, recovers most of the difference:
- "deviation" (CacheBlend): run all placed tokens through the first CHECK_LAYERS layers with full
  attention (their exact K/V for those layers are kept), and recompute the rest of the way the
  tokens whose K/V moved most at the last checked layer;
- "first" (EPIC): the first tokens of each chunk, which act as spurious attention sinks when a
  chunk is encoded alone;
- "mixed": each chunk's first SINK_TOKENS tokens plus the highest-deviation ones;
- recompute="auto": each chunk's first tokens (no selection pass): SINK_TOKENS for chunks stored
  alone (removes the spurious sinks), CONTEXT_FIRST for chunks stored after a context
  (bench/NOTES.md).
Unset, the share and strategy depend on the store (defaults_for): CONTEXT_RECOMPUTE "first" when
every chunk was stored after a context, else settings.DEFAULT_RECOMPUTE "mixed".
Text (before, between and after the chunks) is always computed here, in the same pass as the
recomputed chunk tokens: one pass through the layers for the whole prompt. Recomputed tokens sit
at scattered positions, so they are run through the layers with an explicit mask via ScatterView.
Ape (optional, off by default): APE's temperature/scale on the placed keys left as stored."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

from .. import settings
from ..cache import KVCache
from ..errors import ConfigError
from ..prefill import cache_state
from .placement import fetch, rope_at, stored_at, write_at

STRATEGIES = ("deviation", "first", "mixed")
DEFAULT_STRATEGY = "mixed"  # with settings.DEFAULT_RECOMPUTE: chunks stored alone
# The default when every chunk was stored after a context (no spurious sinks to force out):
# a larger share of each chunk's first tokens, no selection pass (bench/NOTES.md, issue 18).
CONTEXT_RECOMPUTE, CONTEXT_STRATEGY = 0.2, "first"
CHECK_LAYERS = 2  # layer 0's K/V do not depend on context; deviations first show at layer 1
SINK_TOKENS = 4
CONTEXT_FIRST = 16  # "auto", chunks stored after a context: first tokens per chunk


class ScatterView:
    """One layer's cache as seen by queries at scattered, already-cached positions: their new
    K/V overwrite the cached ones, and each query attends to every cached token at or before it."""

    pre_rope = False  # what the attention layer sees: keys come back rotated, never a decode step

    def __init__(self, cache: KVCache, positions: mx.array, n_keys: int, visible: mx.array,
                 bias: mx.array | None = None):
        self.cache, self.positions, self.n_keys = cache, positions, n_keys
        self.window = cache.window
        self.mask = visible  # cache.visible(positions, n_keys): a windowed layer sees less
        if bias is not None:  # an additive logit offset per key (APE's scale: log S)
            seen = bias[cache.start : n_keys].astype(cache.keys.dtype)
            self.mask = mx.where(self.mask, seen[None], mx.array(-mx.inf, seen.dtype))

    def rotate_and_update(self, queries, keys, values, rope):
        write_at(self.cache, self.positions, keys, values, rope)
        keys, values = fetch(self.cache, rope, self.n_keys)
        return rope_at(queries, self.positions, rope), keys, values

    def attention_mask(self, n_queries: int) -> mx.array:
        return self.mask


def forward_at(
    model, cache: list[KVCache], positions: Sequence[int], h: mx.array, layers: range, block: int,
    bias: mx.array | None = None,
) -> mx.array:
    """Run hidden states h (1, m, D) of cached tokens at sorted `positions` through `layers`.

    Blocks of queries go in position order, each through all the layers, so a later block sees the
    earlier blocks' new K/V exactly as a sequential prefill would. bias: an additive logit offset
    per key position (None: none)."""
    outs = []
    for s in range(0, len(positions), block):
        pos_list = positions[s : s + block]
        pos = mx.array(pos_list, dtype=mx.int32)
        n_keys = pos_list[-1] + 1  # later keys are masked anyway: leave them out
        x = h[:, s : s + block]
        masks = {}  # one per (start, window): the same object for alike layers
        for i in layers:
            c = cache[i]
            if (c.start, c.window) not in masks:
                masks[c.start, c.window] = c.visible(pos, n_keys)
            x = model.layers[i](x, ScatterView(c, pos, n_keys, masks[c.start, c.window], bias))
        outs.append(x)
        mx.async_eval(cache_state(cache))
    return mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


AUTO = "auto"


def check_strategy(strategy: str | None, default: str = DEFAULT_STRATEGY) -> str:
    strategy = default if strategy is None else strategy
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"recompute_strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}."
        )
    return strategy


def defaults_for(recompute: float | str | None, strategy: str | None, contexted: bool
                 ) -> tuple[float | str, str]:
    """(fraction, strategy) for a prompt's placed chunks: what the caller set (argument, else
    MLXGEN_RECOMPUTE), each unset one from the store's default: CONTEXT_RECOMPUTE "first" when
    every chunk was stored after a context (contexted), else settings' default share "mixed"."""
    if contexted:
        return (settings.recompute_fraction(recompute, CONTEXT_RECOMPUTE),
                check_strategy(strategy, CONTEXT_STRATEGY))
    return settings.recompute_fraction(recompute), check_strategy(strategy)


@dataclass(frozen=True)
class Ape:
    """APE's attention adjustment (Yang et al., ICLR 2025) for placed chunk keys that were not
    recomputed: their logits divided by `temperature` (folded into the stored keys, so every
    later query, decode included, sees it) and their attention weights multiplied by `scale`
    (an additive log-scale in the mask: the prompt's own pass only). (1, 1) changes nothing."""

    temperature: float = 1.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("temperature", "scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ConfigError(f"APE {name} must be a positive number; got {v!r}.")


def recompute_placed(
    model,
    cache: list[KVCache],
    ids: Sequence[int],
    spans: Sequence[tuple[int, int]],
    text_positions: Sequence[int],
    fraction: float | str,
    strategy: str,
    block: int,
    contexted: bool = False,
    ape: Ape | None = None,
) -> tuple[int, mx.array]:
    """Compute the text and recompute chunk tokens; spans: (start, length) of each placed chunk.
    Returns (chunk tokens recomputed through every layer, the last layer's hidden state of the
    last text position (1, 1, D)): the prompt's last token is always text. contexted: the chunks
    were stored after a context (no spurious sinks), which "auto" takes into account. ape:
    adjust the attention to the placed chunk keys that stay as stored (Ape)."""
    n_chunk = sum(n for _, n in spans)
    n_layers = len(model.layers)
    ids = mx.array(list(ids))
    h, done = None, 0  # hidden states of `selected` after the first `done` layers
    if fraction == AUTO:
        chosen = auto_tokens(spans, contexted)
    else:
        budget = min(n_chunk, math.ceil(fraction * n_chunk - 1e-9))
        if strategy == "first" or budget in (0, n_chunk):
            chosen = _first_tokens(spans, fraction) if budget < n_chunk else _all(spans)
        else:
            chosen, h, done = _check_pass(model, cache, ids, spans, text_positions, budget,
                                          strategy, block)
    selected = sorted(set(chosen) | set(text_positions))
    if h is None:
        h = model.model.embed(ids[mx.array(selected)][None])
    bias = _apply_ape(cache, spans, chosen, ape, done) if ape is not None else None
    h = forward_at(model, cache, selected, h, range(done, n_layers), block, bias)
    return len(chosen), h[:, -1:]


def _check_pass(model, cache, ids, spans, text_positions, budget, strategy, block):
    """CacheBlend's check pass: exact K/V for the first layers and the deviation of each chunk
    token; returns (chosen tokens, hidden states of chosen + text after those layers, layers)."""
    n_layers = len(model.layers)
    c = min(CHECK_LAYERS, n_layers)
    placed = sorted(set(_all(spans)) | set(text_positions))
    pos = mx.array(placed)
    old = stored_at(cache[c - 1], pos)
    h = forward_at(model, cache, placed, model.model.embed(ids[pos][None]), range(c), block)
    new = stored_at(cache[c - 1], pos)
    dev = sum(((n - o) ** 2).sum(axis=(0, 1, 3)) / (o**2).sum(axis=(0, 1, 3)).mean()
              for o, n in zip(old, new))
    chosen = _pick(dev.astype(mx.float32).tolist(), placed, spans, budget, strategy)
    selected = sorted(set(chosen) | set(text_positions))
    index = {p: i for i, p in enumerate(placed)}
    return chosen, h[:, mx.array([index[p] for p in selected])], c


def _apply_ape(cache: list[KVCache], spans, chosen: Sequence[int], ape: Ape, first_layer: int
               ) -> mx.array | None:
    """Fold 1/temperature into the placed chunks' stored keys from `first_layer` on (a check
    pass made the layers before exact; recomputed tokens get fresh keys in the pass anyway);
    return the log-scale bias over key positions (None if scale is 1)."""
    if ape.temperature != 1:
        for c in cache[first_layer:]:
            for start, n in spans:
                a, b = max(start - c.start, 0), start + n - c.start
                if b > a:
                    c.keys[..., a:b, :] = c.keys[..., a:b, :] * (1 / ape.temperature)
    if ape.scale == 1:
        return None
    offset = [0.0] * cache[0].offset
    for p in set(_all(spans)) - set(chosen):
        offset[p] = math.log(ape.scale)
    return mx.array(offset)


def auto_tokens(spans: Sequence[tuple[int, int]], contexted: bool) -> list[int]:
    """recompute="auto": each placed chunk's first tokens, from the prompt's shape alone. Chunks
    stored alone: SINK_TOKENS (their spurious sinks); stored after a context they have no
    spurious sink, and their first CONTEXT_FIRST tokens, which miss the documents before them
    most, are recomputed (bench/NOTES.md, issue 18 second session)."""
    return _first_count(spans, CONTEXT_FIRST if contexted else SINK_TOKENS)


def _all(spans: Sequence[tuple[int, int]]) -> list[int]:
    return [p for start, n in spans for p in range(start, start + n)]


def _first_tokens(spans: Sequence[tuple[int, int]], fraction: float) -> list[int]:
    return [p for start, n in spans for p in range(start, start + math.ceil(fraction * n - 1e-9))]


def _first_count(spans: Sequence[tuple[int, int]], count: int) -> list[int]:
    return [p for start, n in spans for p in range(start, start + min(n, count))]


def _pick(dev: list[float], placed: list[int], spans, budget: int, strategy: str) -> list[int]:
    """The `budget` chunk tokens to recompute: (each chunk's first SINK_TOKENS for "mixed", then)
    the largest deviations."""
    score = dict(zip(placed, dev))
    chunk_pos = _all(spans)
    forced = []
    if strategy == "mixed":
        per_chunk = [range(start, start + min(n, SINK_TOKENS)) for start, n in spans]
        forced = [p for r in per_chunk for p in r][:budget]
    rest = sorted(set(chunk_pos) - set(forced), key=lambda p: -score[p])
    return sorted(forced + rest[: budget - len(forced)])
