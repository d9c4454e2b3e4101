"""ChunkStore: text encoded once into position-independent K/V, reusable at any offset.

A chunk is encoded alone at positions 0..n-1 with a pre-RoPE cache, so its stored keys carry no
absolute position (its tokens' relative positions act only through attention inside the chunk).
It may instead be encoded after a context (e.g. the chat-template head that will precede it in the
prompt), whose K/V are then dropped: the chunk's first token is then no spurious attention sink,
and a chunk placed right after that same context is exact (APE, Yang et al. 2025, shares the
prefix this way). Entries are keyed by the model fingerprint, the context and the token ids, kept
in an LRU bounded by bytes, and optionally persisted as safetensors files (persist.py). An evicted
chunk is reloaded from disk or re-encoded from its ids, so a handle never goes stale."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import mlx.core as mx

from .. import settings
from ..errors import ChunkStoreError, CorruptChunkError, MlxgenError
from ..prefill import cache_state, chunk_size_for
from ..tokenizer import check_text
from . import persist
from .fingerprint import model_fingerprint

log = logging.getLogger("mlxgen")

# Contexts whose K/V a store keeps for encoding (the server uses two: the head, and the head
# with the stand-in document after it); one larger than 1/CONTEXTS_SHARE of the store's byte
# limit is used for its chunk and not kept.
CONTEXTS_KEPT, CONTEXTS_SHARE = 2, 8


@dataclass(frozen=True)
class Chunk:
    """A handle to a stored chunk; place it in a segment prompt: [text, chunk, ..., text]."""

    key: str
    token_ids: tuple[int, ...]
    fingerprint: str
    store: "ChunkStore" = field(compare=False, repr=False)
    context: tuple[int, ...] = ()  # tokens the chunk was encoded after (their K/V not stored)

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class ChunkKV:
    keys: mx.array  # (layers, kv_heads, n, head_dim): pre-RoPE, i.e. keys at positions 0..n-1
    values: mx.array  # (layers, kv_heads, n, head_dim)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def _id_bytes(ids: Sequence[int]) -> bytes:
    return bytes(memoryview(mx.array(list(ids), dtype=mx.int32)))


def chunk_key(fingerprint: str, token_ids: Sequence[int], context: Sequence[int] = ()) -> str:
    """The store key: model, context and tokens (no context: the key chunks always had)."""
    data = fingerprint.encode()
    if context:  # the length keeps (context, ids) splits of one sequence apart
        data += b"|context|%d|" % len(context) + _id_bytes(context)
    return hashlib.sha256(data + _id_bytes(token_ids)).hexdigest()[:40]


def context_tag(fingerprint: str, context: Sequence[int]) -> str:
    """The fingerprint a chunk file records: the model's, plus the context's digest if any."""
    if not context:
        return fingerprint
    return f"{fingerprint}+context:{hashlib.sha256(_id_bytes(context)).hexdigest()[:16]}"


ContextKV = list[tuple[mx.array, mx.array]]  # per layer: a context's pre-RoPE keys and values


def encode_context(model, context: Sequence[int], chunk_size: int | None = None) -> ContextKV:
    """Every layer's unrotated K/V of the context, run from position 0: what encode_chunk would
    compute for it, kept so that chunks stored after one context pay for it once."""
    cache = _run(model, mx.array(list(context)), model.make_cache("pre-rope", keep_all=True),
                 chunk_size_for(model, chunk_size))
    kv = [(c.keys[:, :, : c.offset], c.values[:, :, : c.offset]) for c in cache]
    mx.eval(kv)
    return kv


def encode_chunk(model, token_ids: Sequence[int], chunk_size: int | None = None,
                 context: Sequence[int] = (), context_kv: ContextKV | None = None) -> ChunkKV:
    """Run the context then the tokens from position 0; keep every layer's unrotated K/V of the
    tokens only. context_kv: the context's K/V from encode_context (it is not run again)."""
    step = chunk_size_for(model, chunk_size)
    cache = model.make_cache("pre-rope", keep_all=True)  # every token's K/V, windowed or not
    if context_kv is not None:
        for c, (k, v) in zip(cache, context_kv):
            c.append(k, v)
        tokens = mx.array(list(token_ids))
    else:
        tokens = mx.array(list(context) + list(token_ids))
    _run(model, tokens, cache, step)
    a, b = len(context), cache[0].offset
    kv = ChunkKV(mx.stack([c.keys[0, :, a:b] for c in cache]),
                 mx.stack([c.values[0, :, a:b] for c in cache]))
    mx.eval(kv.keys, kv.values)
    return kv


def _run(model, tokens: mx.array, cache: list, step: int) -> list:
    for start in range(0, tokens.size, step):
        model.model(tokens[None, start : start + step], cache)  # hidden states are not needed
        mx.async_eval(cache_state(cache))
    return cache


class ChunkStore:
    """store = ChunkStore(model, tokenizer, max_bytes=None, path=None); chunk = store.add(text).

    max_bytes bounds the in-memory LRU (default MLXGEN_CHUNK_STORE_BYTES, else 1 GiB); path, a
    directory, persists every chunk as a safetensors file, found again by later stores.
    context (text or token ids): what add() encodes chunks after by default (see add)."""

    def __init__(
        self,
        model,
        tokenizer,
        max_bytes: int | str | None = None,
        path: str | os.PathLike | None = None,
        prefill_chunk_size: int | None = None,
        context: str | Sequence[int] | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_bytes = settings.chunk_store_bytes(max_bytes)
        self.prefill_chunk_size = chunk_size_for(model, prefill_chunk_size)
        self.fingerprint = model_fingerprint(model)
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise ChunkStoreError(f"ChunkStore path must be a directory path or None; got "
                                  f"{type(path).__name__}.")
        self.path = Path(path).expanduser() if path is not None and str(path) != "" else None
        self._key_bytes = b""
        if path is not None:
            self._key_bytes = persist.open_store_dir(self.path or Path(""), self.fingerprint,
                                                     model.model_type)
        self._entries: OrderedDict[str, ChunkKV] = OrderedDict()
        self._contexts: OrderedDict[tuple[int, ...], ContextKV] = OrderedDict()  # see CONTEXTS_KEPT
        self.nbytes = 0  # bytes held in memory
        self.encoded = 0  # chunks encoded by this store (the rest came from memory or disk)
        self.context = self._context_ids(context, False)

    def add(self, chunk: str | Sequence[int], *, parse_special: bool = False,
            context: str | Sequence[int] | None = None) -> Chunk:
        """Encode text (no special tokens added; control-token text kept literal unless
        parse_special) or token ids once; return its handle.

        context (text, encoded as a prompt's start: BOS added; or token ids; default the
        store's): the chunk is encoded after these tokens, whose K/V are not kept. Best: the
        tokens the prompt puts before its documents (chat-template head, system prompt); the
        chunk placed right after exactly those tokens is then exact. An empty context (or
        none) encodes the chunk alone."""
        ids = self._token_ids(chunk, parse_special)
        ctx = self.context if context is None else self._context_ids(context, parse_special)
        handle = Chunk(self._key(ids, ctx), tuple(ids), self.fingerprint, self, ctx)
        self.get(handle)
        return handle

    def get(self, chunk: Chunk) -> ChunkKV:
        """The chunk's K/V: from memory, else disk, else encoded again from its token ids."""
        self.check(chunk)
        kv = self._entries.get(chunk.key)
        if kv is not None:
            self._entries.move_to_end(chunk.key)
            return kv
        self._check_fits(len(chunk))
        kv = self._read(chunk)
        if kv is None:
            kv = encode_chunk(self.model, chunk.token_ids, self.prefill_chunk_size, chunk.context,
                              self._context_kv(chunk.context))
            self.encoded += 1
            if self.path is not None:
                try:
                    persist.save_chunk(self._file(chunk.key), kv.keys, kv.values, chunk.token_ids,
                                       context_tag(self.fingerprint, chunk.context),
                                       self._key_bytes)
                except ChunkStoreError as e:  # keep the encoded K/V: it is good, only unsaved
                    log.warning("mlxgen: %s The chunk is kept in memory only.", e)
        self._insert(chunk.key, kv)
        return kv

    def check(self, chunk: Chunk) -> None:
        """Refuse a handle that is not a chunk of this store's model."""
        if not isinstance(chunk, Chunk):
            raise ChunkStoreError(
                f"expected a Chunk from ChunkStore.add, got {type(chunk).__name__}."
            )
        if chunk.fingerprint != self.fingerprint:
            raise ChunkStoreError(
                f"this chunk was encoded by another model (fingerprint {chunk.fingerprint}, this "
                f"store's model has {self.fingerprint}); add its text to this model's store."
            )
        if chunk.key != self._key(chunk.token_ids, chunk.context):
            raise ChunkStoreError("this chunk handle was altered: its key does not match its ids "
                                  "and context.")

    def __contains__(self, chunk: Chunk) -> bool:
        return isinstance(chunk, Chunk) and chunk.key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every in-memory entry (files on disk stay)."""
        self._entries.clear()
        self._contexts.clear()
        self.nbytes = 0

    def _token_ids(self, chunk: str | Sequence[int], parse_special: bool = False) -> list[int]:
        if isinstance(chunk, str):
            ids = self.tokenizer.encode(check_text(chunk, "chunk text"), add_special_tokens=False,
                                        parse_special=parse_special)
        elif isinstance(chunk, (list, tuple, mx.array)):
            ids = chunk.tolist() if isinstance(chunk, mx.array) else list(chunk)
            vocab = self.model.args.vocab_size
            ok = all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids)
            if not ok:
                raise MlxgenError(f"chunk token ids must be integers in [0, {vocab}).")
        else:
            raise MlxgenError(f"a chunk is text or token ids, not {type(chunk).__name__}.")
        if not ids:
            raise MlxgenError("a chunk needs at least one token.")
        return ids

    def _context_ids(self, context: str | Sequence[int] | None, parse_special: bool
                     ) -> tuple[int, ...]:
        if context is None or (isinstance(context, str) and not context):
            return ()
        if isinstance(context, str):
            if self.tokenizer is None:
                raise MlxgenError("a text context needs the store's tokenizer; give token ids.")
            return tuple(self.tokenizer.encode(check_text(context, "chunk context"),
                                               add_special_tokens=True,
                                               parse_special=parse_special))
        if isinstance(context, (list, tuple, mx.array)) and len(context) == 0:
            return ()
        return tuple(self._token_ids(context, parse_special))

    def kept_context(self, context: tuple[int, ...]) -> ContextKV | None:
        """The K/V of a context this store keeps (see CONTEXTS_KEPT), else None; never encodes."""
        return self._contexts.get(tuple(context)) if context else None

    def _context_kv(self, context: tuple[int, ...]) -> ContextKV | None:
        """The context's K/V, computed once for the last few contexts used: documents stored
        after one head (or one stand-in) share it."""
        if not context:
            return None
        kv = self._contexts.get(context)
        if kv is not None:
            self._contexts.move_to_end(context)
            return kv
        kv = encode_context(self.model, context, self.prefill_chunk_size)
        if sum(k.nbytes + v.nbytes for k, v in kv) <= self.max_bytes // CONTEXTS_SHARE:
            while len(self._contexts) >= CONTEXTS_KEPT:
                self._contexts.popitem(last=False)
            self._contexts[context] = kv
        return kv

    def _key(self, token_ids: Sequence[int], context: Sequence[int] = ()) -> str:
        return chunk_key(self.fingerprint, token_ids, context)

    def _file(self, key: str) -> Path:
        return self.path / f"{key}.safetensors"

    def _read(self, chunk: Chunk) -> ChunkKV | None:
        if self.path is None or not self._file(chunk.key).exists():
            return None
        file = self._file(chunk.key)
        try:
            return ChunkKV(*persist.load_chunk(file, context_tag(self.fingerprint, chunk.context),
                                               chunk.token_ids,
                                               self._kv_shape(), self._kv_dtype(),
                                               self._key_bytes))
        except (CorruptChunkError, persist.ForeignChunkError) as e:
            # Never serve it: set it aside for inspection and encode the chunk again.
            log.warning("%s Re-encoding it.", e)
            suffix = ".foreign" if isinstance(e, persist.ForeignChunkError) else ".corrupt"
            os.replace(file, file.with_suffix(suffix))
            return None

    def _kv_shape(self) -> tuple[int, int, int]:
        args = self.model.args
        return len(self.model.layers), args.num_key_value_heads, args.head_dim

    def _kv_dtype(self) -> mx.Dtype:
        return self.model.kv_dtype

    def _check_fits(self, n_tokens: int) -> None:
        layers, heads, dim = self._kv_shape()
        need = 2 * layers * heads * n_tokens * dim * self._kv_dtype().size
        if need > self.max_bytes:
            raise ChunkStoreError(
                f"a chunk of {n_tokens} tokens needs {need} bytes of K/V, more than the store's "
                f"limit of {self.max_bytes} bytes; raise max_bytes (or MLXGEN_CHUNK_STORE_BYTES) "
                "or split the text into smaller chunks."
            )

    def _insert(self, key: str, kv: ChunkKV) -> None:
        while self._entries and self.nbytes + kv.nbytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)  # least recently used
            self.nbytes -= old.nbytes
        self._entries[key] = kv
        self.nbytes += kv.nbytes
