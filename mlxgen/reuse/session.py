"""Multi-turn sessions: the KV cache is kept between calls and its longest common token prefix
with the next prompt is reused; only the new tokens are prefilled."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from .. import settings
from ..errors import MlxgenError
from ..generate import GenerationResponse, GenerationStats, Prompt, prompt_tokens, stream_generate
from .compose import is_segments


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def trim_to_prefix(cache: list, cached: Sequence[int], ids: Sequence[int]) -> int:
    """Trim `cache`, which holds the K/V of the tokens `cached`, to their longest common prefix
    with the prompt `ids`; return how many tokens it keeps (0: the cache was emptied). Shared by
    Session and the server's prefix cache (mlxgen/server/prefix_cache.py)."""
    # Keep at least the last prompt token to prefill: its logits start the reply.
    keep = min(common_prefix(cached, ids), len(ids) - 1)
    for c in cache:
        c.trim(c.offset - keep)
    if any(c.offset != keep for c in cache):
        # A windowed layer had already forgotten keys that the kept prefix needs: start over.
        for c in cache:
            c.trim(c.offset)
        keep = 0
    return keep


class Session:
    """session = Session(model, tokenizer); session.generate(messages_or_prompt, **kw).

    Every call takes the whole conversation (chat messages, text or token ids), not a delta: an
    edited earlier message simply shortens the reused prefix (the cache is trimmed there). After
    each call `stats` holds the GenerationStats, with cached_tokens / prefill_tokens."""

    def __init__(self, model, tokenizer, *, cache_mode: str | None = None,
                 cache_reuse: bool | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.cache = model.make_cache(cache_mode)
        self.reuse = settings.cache_reuse(cache_reuse)
        self.tokens: list[int] = []  # exactly the tokens whose K/V are in self.cache, in order
        self.stats: GenerationStats | None = None
        self._turn = 0  # only the newest stream (turn == self._turn) may touch cache and tokens

    def stream_generate(self, prompt: Prompt, **kw: Any) -> Iterator[GenerationResponse]:
        """Like mlxgen.stream_generate (same keywords), reusing this session's cache.

        Starting a new stream supersedes an unfinished older one: the older one never touches the
        session again (resuming it raises MlxgenError; collecting it changes nothing)."""
        if is_segments(prompt):
            raise MlxgenError(
                "a Session takes text, chat messages or token ids; compose chunk segments with "
                "mlxgen.generate / stream_generate."
            )
        ids = prompt_tokens(self.tokenizer, prompt, self.model.args.vocab_size,
                            kw.get("parse_special", False))
        self._turn += 1
        turn = self._turn
        keep = trim_to_prefix(self.cache, self.tokens if self.reuse else [], ids)
        self.tokens = ids[:keep]
        out: list[int] = []
        kw.pop("parse_special", None)  # ids are already tokenized
        stream = stream_generate(self.model, self.tokenizer, ids, cache=self.cache, **kw)
        try:
            for response in stream:
                out.append(response.token)
                self.stats = response.stats
                yield response
                if turn != self._turn:  # resumed after a newer stream started: the cache is its
                    raise MlxgenError(
                        "this Session stream was superseded by a newer one on the same session; "
                        "its cache now holds the newer conversation. Start a new stream.")
        finally:
            stream.close()
            if turn == self._turn:
                # Every yielded token has been fed to the model except possibly the last one.
                self.tokens = (ids + out)[: self.cache[0].offset]

    def generate(self, prompt: Prompt, *, verbose: bool = False, **kw: Any) -> str:
        """The whole reply as a string; self.stats holds its stats."""
        text = ""
        for response in self.stream_generate(prompt, **kw):
            text += response.text
            if verbose:
                print(response.text, end="", flush=True)
        if verbose and self.stats is not None:
            print("\n" + self.stats.summary())
        return text

    def reset(self) -> None:
        """Forget the cached conversation (an unfinished stream is superseded)."""
        self._turn += 1
        for c in self.cache:
            c.trim(c.offset)
        self.tokens = []

    @property
    def cached_tokens(self) -> int:
        return len(self.tokens)
