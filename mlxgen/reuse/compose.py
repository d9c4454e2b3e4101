"""Segment prompts: [text, chunk, chunk, text] -> a KV cache with stored chunks placed.

Layout of a composed prompt:
- each chunk's stored K/V is spliced at its offset: in a standard (post-RoPE) cache one
  mx.fast.rope(k, offset=p) per layer, in a pre-RoPE cache a plain append; text gets placeholders;
- then one pass (recompute.py) computes all the text (before, between and after the chunks) and
  the recomputed share of chunk tokens together, each attending to everything before it; a prompt
  that ends with a chunk has that chunk's last token computed there, since logits are needed.
The splice keeps the cache mode's own fast path: by default (standard) the rotation is paid once
at splice time, so decoding attends exactly as after a normal prefill.
A prompt that opens with exactly the context its first chunk was stored after (the chat-template
head) has that head's K/V spliced too when the chunk's store still keeps them: they are exact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .. import settings
from ..cache import KVCache
from ..errors import ChunkStoreError, MlxgenError
from ..prefill import chunk_size_for, prefill
from ..tokenizer import check_text
from .chunk_store import Chunk, ContextKV
from .fingerprint import model_fingerprint
from .placement import splice
from .recompute import Ape, defaults_for, recompute_placed


def is_segments(prompt: Any) -> bool:
    """A segment prompt: a list holding text (str) and/or Chunk segments."""
    return isinstance(prompt, (list, tuple)) and any(isinstance(s, (str, Chunk)) for s in prompt)


@dataclass
class Segment:
    ids: list[int]
    chunk: Chunk | None = None  # None: text


@dataclass
class Composition:
    segments: list[Segment]
    ids: list[int]
    cached_tokens: int = 0  # prompt tokens served from the store (not computed)
    recomputed: int = 0  # chunk tokens recomputed

    def run(
        self,
        model,
        *,
        cache_mode: str | None = None,
        recompute: float | None = None,
        recompute_strategy: str | None = None,
        prefill_chunk_size: int | None = None,
        cache_reuse: bool | None = None,
        ape: Ape | None = None,
    ) -> tuple[list[KVCache], mx.array]:
        """Build the cache for the whole prompt; return it and the last position's logits.
        ape: APE's temperature/scale on the placed chunk keys left as stored (recompute.Ape)."""
        # A prompt whose chunks were all stored after a context gets that store's default.
        contexted = all(s.chunk.context for s in self.segments if s.chunk is not None)
        fraction, strategy = defaults_for(recompute, recompute_strategy, contexted)
        block = chunk_size_for(model, prefill_chunk_size)
        cache = model.make_cache(cache_mode)
        kinds = [s.chunk is not None for s in self.segments]
        if not settings.cache_reuse(cache_reuse) or not any(kinds):
            return cache, prefill(model, self.ids, cache, block)
        spans, text = [], []  # spans: (start, length) of chunks not exact as stored
        spliced, first = 0, kinds.index(True)
        head = _stored_head(self.segments[first].chunk,
                            self.ids[: sum(len(s.ids) for s in self.segments[:first])])
        if head is not None:  # the text before the first chunk, from the store
            _splice_layers(model, cache, head)
            spliced = head[0][0].shape[2]
        for i, seg in enumerate(self.segments):
            if head is not None and i < first:
                continue
            start = cache[0].offset
            n = 0  # tokens spliced from the store
            if seg.chunk is not None:
                # The prompt's last token is always computed here: logits are needed there.
                n = len(seg.ids) - (i == len(self.segments) - 1)
                if n:
                    _splice(model, cache, seg.chunk, n)
                    spliced += n
                    if not _exact(seg.chunk, self.ids, start):
                        spans.append((start, n))
            _place_zeros(model, cache, len(seg.ids) - n)  # placeholders: computed below
            text.extend(range(start + n, start + len(seg.ids)))
        self.recomputed, hidden = recompute_placed(model, cache, self.ids, spans, text, fraction,
                                                   strategy, block, contexted, ape)
        self.cached_tokens = spliced - self.recomputed
        return cache, model.logits(hidden)[:, -1, :]


def plan(model, tokenizer, segments: list | tuple, parse_special: bool = False) -> Composition:
    """Tokenize text segments (BOS only for a leading one; control-token text literal unless
    parse_special), take token-id segments as they are, and check the chunks."""
    out: list[Segment] = []
    fingerprint = None
    for i, seg in enumerate(segments):
        if isinstance(seg, str):
            ids = tokenizer.encode(check_text(seg, f"segment {i}"), add_special_tokens=(i == 0),
                                   parse_special=parse_special)
            if ids:
                out.append(Segment(ids))
        elif isinstance(seg, Chunk):
            if seg.store.model is not model:  # another object may still be the same model
                fingerprint = fingerprint or model_fingerprint(model)
                if seg.fingerprint != fingerprint:
                    raise ChunkStoreError(
                        f"segment {i} is a chunk encoded by another model (fingerprint "
                        f"{seg.fingerprint}, this model's is {fingerprint}); add its text to a "
                        "ChunkStore of this model."
                    )
            seg.store.check(seg)
            out.append(Segment(list(seg.token_ids), seg))
        elif isinstance(seg, (list, tuple)) and seg and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < model.args.vocab_size
            for t in seg
        ):  # already tokenized text (the server's rendered chat template)
            out.append(Segment(list(seg)))
        else:
            raise MlxgenError(
                f"segment {i} is a {type(seg).__name__}; a segment prompt holds text (str), "
                "token ids (a list of ints in the vocabulary) and chunks (ChunkStore.add(...))."
            )
    if not out:
        raise MlxgenError("the prompt is empty; give at least one token.")
    return Composition(out, [t for s in out for t in s.ids])


def _exact(chunk: Chunk, ids: list[int], start: int) -> bool:
    """A chunk preceded by exactly the context it was encoded after (none: it starts the prompt)
    saw all it would see in a full prefill: its stored K/V are exact."""
    return len(chunk.context) == start and tuple(ids[:start]) == chunk.context


def _stored_head(chunk: Chunk, before: list[int]) -> ContextKV | None:
    """The K/V of the text before the first chunk (`before`) when that text is the context the
    chunk was stored after and the chunk's store still keeps that context's K/V, else None."""
    if not before or tuple(before) != chunk.context:
        return None
    return chunk.store.kept_context(chunk.context)


def _splice(model, cache: list[KVCache], chunk: Chunk, n: int) -> None:
    kv = chunk.store.get(chunk)
    _splice_layers(model, cache, [(kv.keys[i, None, :, :n], kv.values[i, None, :, :n])
                                  for i in range(len(cache))])


def _splice_layers(model, cache: list[KVCache], kv: ContextKV) -> None:
    """Append each layer's stored (pre-RoPE keys, values) at the cache's offset."""
    for layer, c, (k, v) in zip(model.layers, cache, kv):
        splice(c, k, v, layer.self_attn.rope)


def _place_zeros(model, cache: list[KVCache], n: int) -> None:
    if not n:
        return
    args = model.args
    z = mx.zeros((1, args.num_key_value_heads, n, args.head_dim), _dtype(cache, model))
    for c in cache:
        c.update_and_fetch(z, z)


def _dtype(cache: list[KVCache], model) -> mx.Dtype:
    return cache[0].keys.dtype if cache[0].keys is not None else model.kv_dtype
