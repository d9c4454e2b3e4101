"""Key/value caches. RoPE is applied by the cache's `rotate_and_update`, the seam where the cache
mode decides when keys are rotated (and a fused kernel may later rotate inside attention):

- KVCache (standard, mlx-lm's behaviour): keys are stored rotated at their positions.
- PreRopeKVCache: keys are stored as projected (after Qwen3's k_norm), before rotation, and rotated
  when attended. RoPE is the identity at position 0, so these are "keys encoded at position 0":
  position-independent K/V that can be placed anywhere (mlxgen/reuse).

Either cache may have a sliding `window` (Mistral v0.1, Gemma's local layers): a query at position
p sees keys p - window + 1 .. p. A windowed cache drops the keys no later query can see (in steps
of `step` tokens, so a decode step never copies), so it holds at most window + step + a prefill
chunk's tokens; `start` is the position of its first stored token. Only attending drops keys:
reuse surgery (mlxgen/reuse/placement.py) may write anywhere from `start` on."""

from __future__ import annotations

from typing import Callable, Literal

import mlx.core as mx

from . import settings

Rope = Callable[[mx.array, "int | mx.array"], mx.array]
Mask = Literal["causal"] | mx.array | None


class KVCache:
    """Post-RoPE cache (mlx-lm's behaviour): keys are stored already rotated.

    Storage grows in steps of `step` tokens so appending a chunk is a slice update, not a concat;
    prefill reserves a prompt's whole length first (`reserve`), so a prompt is one allocation."""

    step = 256
    pre_rope = False

    def __init__(
        self, window: int | None = None, keep_all: bool = False, dtype: mx.Dtype | None = None
    ) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # tokens seen (the position of the next one)
        self.start = 0  # position of the first stored token
        self.window = window
        self.keep_all = keep_all  # a windowed cache that keeps every token (chunk encoding)
        self.reserved = 0  # position up to which storage is wanted (reserve)
        self.dtype = dtype  # storage dtype (None: the first keys'); writes are cast to it

    def rotate_and_update(
        self, queries: mx.array, keys: mx.array, values: mx.array, rope: Rope
    ) -> tuple[mx.array, mx.array, mx.array]:
        """Rotate q/k by the current offset, append k/v; return (queries, all keys, all values)."""
        self.drop_unseen()
        queries, keys = rope.pair(queries, keys, self.offset)
        keys, values = self.update_and_fetch(keys, values)
        return queries, keys, values

    def attention_mask(self, n_queries: int) -> Mask:
        """Mask for the queries just passed to rotate_and_update (the last cached tokens)."""
        if self.window is not None and self.offset - self.start > self.window:
            positions = mx.arange(self.offset - n_queries, self.offset)
            return self.visible(positions, self.offset)
        return "causal" if n_queries > 1 else None

    def visible(self, positions: mx.array, n_keys: int) -> mx.array:
        """(m, n_keys - start) bool: which stored keys (positions start .. n_keys - 1) queries at
        `positions` may see: those at or before them, and inside the window."""
        keys = mx.arange(self.start, n_keys)[None]
        queries = positions[:, None]
        seen = keys <= queries
        if self.window is not None:
            seen = seen & (keys > queries - self.window)
        return seen

    def drop_unseen(self) -> None:
        """Windowed: forget the keys that no query from `offset` on can see, once a whole
        `step` of them has accumulated (the copy is then rare and the memory stays bounded)."""
        if self.window is None or self.keep_all or self.keys is None:
            return
        first = self.offset - self.window + 1
        if first - self.start >= self.step:
            self._realloc(first - self.start, self.offset - first)
            self.start = first

    def reserve(self, n: int) -> None:
        """Make room for `n` more tokens (a prompt about to be prefilled): one allocation instead
        of one per chunk, each of which would leave a freed buffer in MLX's buffer cache. A
        windowed cache that drops keys grows only as it needs to."""
        if self.window is not None and not self.keep_all:
            return
        self.reserved = max(self.reserved, self.offset + n)
        if self.keys is not None and self.reserved - self.start > self.keys.shape[2]:
            self._realloc(0, self.reserved - self.start)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.append(keys, values)
        n = self.offset - self.start
        return self.keys[:, :, :n], self.values[:, :, :n]

    def append(self, keys: mx.array, values: mx.array) -> None:
        """Store keys and values (B, H, n, D) after the cached tokens (a decode kernel that reads
        the whole buffers calls this rather than update_and_fetch, whose views it has no use for)."""
        prev = self.offset - self.start
        n = keys.shape[2]
        if self.keys is None:
            B, H, _, Dk = keys.shape
            self.keys = mx.zeros((B, H, 0, Dk), self.dtype or keys.dtype)
            self.values = mx.zeros((B, H, 0, values.shape[3]), self.dtype or values.dtype)
        if prev + n > self.keys.shape[2]:
            self._realloc(0, max(prev + n, self.reserved - self.start))
        self.offset += n
        # Plain slices, not `...`: MLX's indexing with an ellipsis takes a slower path, and this
        # runs for every layer of every decode step.
        self.keys[:, :, prev : prev + n] = keys
        self.values[:, :, prev : prev + n] = values

    def _realloc(self, drop: int, needed: int) -> None:
        # New buffers of a multiple of `step` rows holding stored tokens drop.. (up to offset).
        B, H, _, Dk = self.keys.shape
        Dv = self.values.shape[3]
        size = ((needed + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((B, H, size, Dk), self.keys.dtype)
        new_v = mx.zeros((B, H, size, Dv), self.values.dtype)
        used = self.offset - self.start
        if used > drop:
            new_k[..., : used - drop, :] = self.keys[..., drop:used, :]
            new_v[..., : used - drop, :] = self.values[..., drop:used, :]
        self.keys, self.values = new_k, new_v

    @property
    def state(self) -> list[mx.array]:
        """The arrays to evaluate after a prefill chunk (only the filled part)."""
        if self.keys is None:
            return []
        return [self.keys, self.values]

    def trim(self, n: int) -> int:
        """Drop the last `n` cached tokens (e.g. when a conversation diverges); returns how many.
        A windowed cache that already forgot keys the shortened prefix would need is emptied."""
        n = min(self.offset, n)
        self.offset -= n
        if self.start > 0 and self.offset - self.window + 1 < self.start:
            n += self.offset
            self.offset = self.start = 0
        return n

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.keys.shape[2] == 0:
            return 0
        stored = self.offset - self.start
        return (self.keys.nbytes + self.values.nbytes) * stored // self.keys.shape[2]


class PreRopeKVCache(KVCache):
    """Pre-RoPE cache: stores unrotated keys, rotates all of them when attending.

    Same storage, growth and trimming as KVCache; only where the rotation happens differs. On
    Metal a decode kernel may rotate the keys in registers instead (mlxgen/backends/metal)."""

    pre_rope = True

    def rotate_and_update(
        self, queries: mx.array, keys: mx.array, values: mx.array, rope: Rope
    ) -> tuple[mx.array, mx.array, mx.array]:
        self.drop_unseen()
        queries = rope(queries, self.offset)
        keys, values = self.update_and_fetch(keys, values)
        # Stored key j is its key at position 0; rope(keys, start) rotates it to position start + j.
        return queries, rope(keys, self.start), values


CACHE_CLASSES = {"standard": KVCache, "pre-rope": PreRopeKVCache}


def make_cache(
    num_layers: int,
    mode: str | None = None,
    default: str = "standard",
    windows: list[int | None] | None = None,
    keep_all: bool = False,
    dtype: str | mx.Dtype | None = None,
) -> list[KVCache]:
    """One cache per layer; mode "standard" or "pre-rope" (else MLXGEN_CACHE_MODE, else default).
    windows: each layer's sliding window (None: full attention); keep_all: never drop tokens;
    dtype: storage dtype of keys and values (a name or mx.Dtype; None: the model's)."""
    cls = CACHE_CLASSES[settings.cache_mode(mode, default)]
    windows = windows or [None] * num_layers
    if isinstance(dtype, str):
        dtype = getattr(mx, dtype)
    return [cls(windows[i], keep_all, dtype) for i in range(num_layers)]
