"""generate / stream_generate: prompt -> prefill -> decode loop -> streamed text with stats."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import mlx.core as mx

from . import backends, settings
from .errors import ConfigError, MlxgenError, PromptTooLongError
from .prefill import prefill
from .sampling import StreamSampler, sample_utils
from .tokenizer import Tokenizer, check_text

# ... or a segment prompt [text, Chunk, ..., text] (mlxgen.reuse.compose).
Prompt = str | Sequence[int] | Sequence[dict[str, Any]] | Sequence[Any]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens actually computed (the rest came from a cache)
    cached_tokens: int = 0
    ttft_s: float = 0.0
    prefill_tps: float = 0.0
    generation_tokens: int = 0
    decode_tps: float = 0.0
    peak_memory_gb: float = 0.0

    def summary(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tok ({self.cached_tokens} cached), TTFT {self.ttft_s:.3f} s, "
            f"prefill {self.prefill_tps:.1f} tok/s, decode {self.generation_tokens} tok at "
            f"{self.decode_tps:.1f} tok/s, peak memory {self.peak_memory_gb:.2f} GB"
        )


@dataclass
class GenerationResponse:
    text: str  # the new text since the previous response (may be empty)
    token: int
    finish_reason: str | None  # "stop" (eos or stop string), "length", or None while running
    stats: GenerationStats


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    seed: int | None = None
    stop: Sequence[str] = ()

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"{name} must be {rule}; got {getattr(self, name)!r}.")

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "an integer >= 1")
        if not _is_num(self.temperature) or not 0 <= self.temperature < math.inf:
            raise bad("temperature", "a finite number >= 0 (0 means greedy)")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1] (1 disables it)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0, or >= the vocabulary size, disables it)")
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1] (0 disables it)")
        if self.repetition_penalty is not None and (
            not _is_num(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf
        ):
            raise bad("repetition_penalty", "a finite number > 0 (1 or None disables it)")
        if not _is_int(self.repetition_context_size) or self.repetition_context_size < 1:
            raise bad("repetition_context_size", "an integer >= 1")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**64):
            raise bad("seed", "an integer in [0, 2**64) or None")
        if self.stop is None:
            self.stop = ()
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, (list, tuple)) or not all(
            isinstance(s, str) and s for s in self.stop
        ):
            raise bad("stop", "a non-empty string, a list of non-empty strings, or None")
        for s in self.stop:
            check_text(s, "stop")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def prompt_tokens(
    tokenizer: Tokenizer, prompt: Prompt, vocab_size: int, parse_special: bool = False
) -> list[int]:
    """A string, chat messages (chat template applied) or token ids -> token ids.

    Text is encoded literally: "<|im_end|>" typed by a user stays text. Only the chat template's
    own control tokens are special. parse_special=True parses control tokens in a string prompt
    (for callers who pass a template they rendered themselves)."""
    if not isinstance(parse_special, bool):
        raise ConfigError(f"parse_special must be True or False; got {parse_special!r}.")
    if isinstance(prompt, str):
        ids = tokenizer.encode(check_text(prompt, "prompt"), parse_special=parse_special)
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        ids = tokenizer.encode_chat(list(prompt))
    elif isinstance(prompt, (list, tuple, mx.array)):
        ids = prompt.tolist() if isinstance(prompt, mx.array) else list(prompt)
        if not all(_is_int(t) and 0 <= t < vocab_size for t in ids):
            raise MlxgenError(f"token ids must be integers in [0, {vocab_size}).")
    else:
        raise MlxgenError(
            f"prompt must be a string, a list of chat messages or a list of token ids; got "
            f"{type(prompt).__name__}."
        )
    if not ids:
        raise MlxgenError("the prompt is empty; give at least one token.")
    return ids


def stream_generate(model, tokenizer: Tokenizer, prompt: Prompt, **kw: Any) -> Iterator[GenerationResponse]:
    """Yield one GenerationResponse per generated token. Sampling keywords: max_tokens,
    temperature, top_p, top_k, min_p, repetition_penalty, repetition_context_size, seed, stop.

    cache: a KV cache (list of per-layer caches) already holding the first `cache[0].offset`
    prompt tokens (mlxgen.Session manages one); only the rest is prefilled, and the cache keeps
    growing. cache_mode: "standard" or "pre-rope" for a new cache (default: the model's, chosen
    for this device at load). prefill_chunk_size: prompt tokens per prefill chunk. recompute,
    recompute_strategy: for segment prompts (mlxgen.reuse; unset, their defaults depend on how the
    chunks were stored). parse_special: parse control
    tokens written in prompt text (off by default: text is encoded literally, see README)."""
    # Metal: the weights stay wired while generating (as mlx-lm); elsewhere nothing to do.
    if not model.runtime.wired_limit:
        yield from _stream_generate(model, tokenizer, prompt, **kw)
        return
    from .backends.metal.memory import wired_limit  # Metal only: not imported elsewhere

    with wired_limit(model):
        yield from _stream_generate(model, tokenizer, prompt, **kw)


def _is_segments(prompt: Prompt) -> bool:
    # Text, token ids or chat messages never import mlxgen.reuse (a Chunk exists only once it is).
    if not isinstance(prompt, (list, tuple)) or all(isinstance(t, (int, dict)) for t in prompt):
        return False
    from .reuse.compose import is_segments

    return is_segments(prompt)


def _stream_generate(
    model,
    tokenizer: Tokenizer,
    prompt: Prompt,
    *,
    prefill_chunk_size: int | None = None,
    cache: list | None = None,
    cache_mode: str | None = None,
    recompute: float | None = None,
    recompute_strategy: str | None = None,
    parse_special: bool = False,
    **sampling: Any,
) -> Iterator[GenerationResponse]:
    """stream_generate's body, run inside its memory context."""
    start = time.perf_counter()
    backends.check_environment()
    params = SamplingParams(**sampling)
    settings.recompute_fraction(recompute)  # validated for every prompt form, used by segments
    if recompute_strategy is not None:
        from .reuse.recompute import check_strategy

        check_strategy(recompute_strategy)
    if _is_segments(prompt):
        from .reuse.compose import plan

        composed = plan(model, tokenizer, prompt, parse_special=parse_special)
        ids = composed.ids
    else:
        composed = None
        ids = prompt_tokens(tokenizer, prompt, model.args.vocab_size, parse_special)
    cached = 0 if cache is None else cache[0].offset
    if composed is not None and cache is not None:
        raise ConfigError("a segment prompt builds its own cache; do not pass cache= with it.")
    if cached >= len(ids):
        raise ConfigError(f"the cache holds {cached} tokens but the prompt has only {len(ids)}; "
                          "at least the last prompt token must be prefilled.")
    context = model.args.max_position_embeddings
    if len(ids) >= context:
        raise PromptTooLongError(
            f"the prompt has {len(ids)} tokens but the model's context is {context}; shorten it."
        )
    max_tokens = min(params.max_tokens, context - len(ids))
    sampler = StreamSampler(params.temperature, params.top_p, params.min_p, params.top_k,
                            params.seed)
    processors = sample_utils.make_logits_processors(
        repetition_penalty=params.repetition_penalty,
        repetition_context_size=params.repetition_context_size,
    )
    window = params.repetition_context_size
    history = mx.array(ids[-window:])

    def sample(logits: mx.array) -> mx.array:
        nonlocal history
        for processor in processors:
            logits = processor(history, logits)
        if sampler.key is not None:  # sampling reads log-probabilities; greedy's argmax needs none
            logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logits)
        if processors:
            history = mx.concatenate([history, token])[-window:]
        return token

    mx.reset_peak_memory()
    if composed is not None:
        cache, logits = composed.run(
            model, cache_mode=cache_mode, recompute=recompute,
            recompute_strategy=recompute_strategy, prefill_chunk_size=prefill_chunk_size,
        )
        cached = composed.cached_tokens
    else:
        cache = cache if cache is not None else model.make_cache(cache_mode)
        logits = prefill(model, ids[cached:], cache, prefill_chunk_size)
    stats = GenerationStats(
        prompt_tokens=len(ids), prefill_tokens=len(ids) - cached, cached_tokens=cached
    )
    token = sample(logits)
    mx.async_eval(token)
    detok = tokenizer.detokenizer()
    stop = _StopMatcher(params.stop)
    first_time = None
    for n in range(max_tokens):
        if n + 1 < max_tokens:  # queue the next step before reading this one
            next_token = sample(model(token[None], cache)[:, -1, :])
            mx.async_eval(next_token)
        tok = token.item()
        now = time.perf_counter()
        if first_time is None:
            first_time = now
            stats.ttft_s = now - start
            stats.prefill_tps = stats.prefill_tokens / stats.ttft_s
        stats.generation_tokens = n + 1
        if n > 0:
            stats.decode_tps = n / (now - first_time)
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        if tok in tokenizer.eos_token_ids:
            yield GenerationResponse(stop.flush(), tok, "stop", stats)
            return
        text, stopped = stop.feed(detok.add_token(tok))
        if stopped:
            yield GenerationResponse(text, tok, "stop", stats)
            return
        if n + 1 == max_tokens:
            yield GenerationResponse(text + stop.flush(), tok, "length", stats)
            return
        yield GenerationResponse(text, tok, None, stats)
        token = next_token


def generate(model, tokenizer: Tokenizer, prompt: Prompt, *, verbose: bool = False, **kw: Any) -> str:
    """The whole completion as a string (stop strings and eos excluded)."""
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, **kw):
        text += response.text
        if verbose:
            print(response.text, end="", flush=True)
    if verbose and response is not None:
        print("\n" + response.stats.summary())
    return text


class _StopMatcher:
    """Holds back text that might be the start of a stop string, so none is ever emitted."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = max((_overlap(self.pending, s) for s in self.stops), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for k in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
