"""One generation request, whatever the API: runs on the worker thread through the library's
own stream_generate, with the prefix cache or documents as stored chunks; and the event-loop
side that starts it, watches the client and iterates its output."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, AsyncIterator

from ..errors import ConfigError, PromptTooLongError
from ..generate import GenerationStats, SamplingParams, prompt_tokens, stream_generate
from ..reuse.stand_in import after_stand_in
from ..tokenizer import check_text
from .pool import ModelPool
from .worker import END, Job, Worker


@dataclass
class GenRequest:
    model: str
    prompt: str | list[dict] | None  # text, chat messages, or None: only load (or unload) the model
    sampling: dict[str, Any]
    keep_alive: float  # seconds; math.inf: forever
    documents: list[str] = field(default_factory=list)  # the `mlxgen` extension field
    reuse: bool = True
    received: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        SamplingParams(**self.sampling)  # bad options are a 400 before anything is queued
        if not isinstance(self.documents, list) or not all(
                isinstance(d, str) and d for d in self.documents):
            raise ConfigError("mlxgen.documents must be a list of non-empty strings.")
        for i, d in enumerate(self.documents):
            check_text(d, f"mlxgen.documents[{i}]")
        if not isinstance(self.reuse, bool):
            raise ConfigError(f"mlxgen.reuse must be true or false; got {self.reuse!r}.")


@dataclass
class Token:
    text: str
    finish_reason: str | None


@dataclass
class Done:
    finish_reason: str | None  # "stop", "length", None (cancelled), "load" / "unload"
    stats: GenerationStats
    load_s: float
    prompt_s: float  # request start to first token (prefill), load excluded
    eval_s: float  # first token to last
    total_s: float  # request received to done, queueing and load included


class Engine:
    def __init__(self, pool: ModelPool, worker: Worker, reuse: bool = True):
        self.pool, self.worker, self.reuse = pool, worker, reuse

    def run(self, req: GenRequest, job: Job) -> None:
        """The worker-thread body of one request (worker.Job.fn)."""
        entry, load_s = self.pool.acquire(req.model)
        try:
            if req.prompt is None:
                reason = "unload" if req.keep_alive == 0 else "load"
                done = Done(reason, GenerationStats(), load_s, 0.0, 0.0, 0.0)
            else:
                done = self._generate(entry, req, job, load_s)
        finally:
            self.pool.release(entry, req.keep_alive)
        done.total_s = time.perf_counter() - req.received
        job.put(done)  # after the release: with keep_alive 0 the model is gone by now

    def _generate(self, entry, req: GenRequest, job: Job, load_s: float) -> Done:
        model, tokenizer = entry.model, entry.tokenizer
        reuse = req.reuse and self.reuse
        cache, ids = None, []
        if req.documents:
            prompt = self._with_documents(entry, req, reuse)
        else:
            ids = prompt_tokens(tokenizer, req.prompt, model.args.vocab_size)
            prompt = ids
            if reuse:
                cache, _ = self.pool.prefix_cache.take(entry.fingerprint, model, ids)
        start = time.perf_counter()
        first = None
        out: list[int] = []
        response = None
        stream = stream_generate(model, tokenizer, prompt, cache=cache, **req.sampling)
        try:
            for response in stream:
                out.append(response.token)
                first = first or time.perf_counter()
                job.put(Token(response.text, response.finish_reason))
                if job.cancel.is_set():  # the client left: stop between tokens
                    break
        finally:
            stream.close()
            if cache is not None and len({c.offset for c in cache}) == 1:
                self.pool.prefix_cache.put(entry.fingerprint, (ids + out)[: cache[0].offset],
                                           cache)
        end = time.perf_counter()
        stats = dataclasses.replace(response.stats) if response else GenerationStats()
        first = first or end
        reason = response.finish_reason if response and not job.cancel.is_set() else None
        return Done(reason, stats, load_s, first - start, end - first, 0.0)

    def _with_documents(self, entry, req: GenRequest, reuse: bool) -> list:
        """The prompt's head (chat: the template up to the first user message's content, i.e.
        BOS, system prompt, start of the user turn; text: BOS if the tokenizer adds one), the
        documents separated by blank lines, a blank line, then the rest of the prompt. With reuse
        a segment prompt whose documents are chunks stored after that head (ChunkStore context:
        keyed by it, so another head never gets them, and the first document is exact; the others
        after the head, reuse.stand_in's document and the separator); without, the same tokens
        prefilled."""
        tokenizer = entry.tokenizer
        head, tail = _document_frame(tokenizer, req.prompt)
        docs = [tokenizer.encode(d, add_special_tokens=False, parse_special=False)
                for d in req.documents]
        docs = [d for d in docs if d]
        sep = tokenizer.encode(DOCUMENT_SEPARATOR, add_special_tokens=False)
        total = len(head) + sum(map(len, docs)) + len(sep) * len(docs) + len(tail)
        context = entry.model.args.max_position_embeddings
        if total >= context:  # before any chunk is encoded
            raise PromptTooLongError(f"the documents and prompt have {total} tokens but the "
                                     f"model's context is {context}; send fewer or shorter ones.")
        if reuse:  # the first document after the head; the others after a stand-in document too
            store = self.pool.chunk_store(entry)
            later = after_stand_in(tokenizer, head, sep)
            docs = [store.add(d, context=later if i else head) for i, d in enumerate(docs)]
        parts: list = [head] if head else []
        for i, d in enumerate(docs):
            parts += [sep, d] if i else [d]
        parts.append(sep + tail)
        return parts if reuse else [t for p in parts for t in p]

    async def start(self, req: GenRequest, receive) -> "Generation":
        """Queue the request; return once it produced its first output (a token, or Done).
        Raises what the job raised before that (unknown model, prompt too long, ...), so the
        route can still answer with an error status."""
        job = Job(partial(self.run, req), asyncio.get_running_loop())
        watcher = asyncio.create_task(_watch_disconnect(receive, job))
        self.worker.submit(job)
        first = await job.get()
        if isinstance(first, BaseException):
            job.cancel.set()
            watcher.cancel()
            raise first
        return Generation(job, first, watcher)


@dataclass
class Generation:
    job: Job
    first: Any
    watcher: asyncio.Task

    async def events(self) -> AsyncIterator[Token | Done]:
        """Tokens, then Done (which arrives only after the model was released, so keep_alive 0
        has unloaded it). A stream that stops early (client gone) cancels the job."""
        item = self.first
        try:
            while item is not END:
                if isinstance(item, BaseException):
                    raise item
                yield item
                item = await self.job.get()
        finally:
            self.job.cancel.set()
            self.watcher.cancel()

    async def collect(self) -> tuple[str, Done]:
        text, done = "", None
        async for item in self.events():
            if isinstance(item, Token):
                text += item.text
            else:
                done = item
        return text, done


DOCUMENT_SEPARATOR = "\n\n"


def _document_frame(tokenizer, prompt: str | list[dict]) -> tuple[list[int], list[int]]:
    """(head, tail): the prompt's tokens before and after where documents go. Chat: the start of
    the first user message's content (none: before the conversation); text: after BOS."""
    if isinstance(prompt, str):
        head = tokenizer.encode("", add_special_tokens=True)
        return head, tokenizer.encode(prompt, add_special_tokens=False, parse_special=False)
    users = [i for i, m in enumerate(prompt) if m.get("role") == "user"]
    if users:
        marker = f"\ue002{secrets.token_hex(8)}\ue003"  # found only where we put it
        first = prompt[users[0]]
        messages = list(prompt)
        messages[users[0]] = {**first, "content": marker + _text(first.get("content"))}
        pieces = tokenizer.encode_chat_split(messages, marker)
        if len(pieces) == 2:
            return pieces[0], pieces[1]
    return [], tokenizer.encode_chat(prompt)


def _text(content: Any) -> str:
    return content if isinstance(content, str) else ""


async def _watch_disconnect(receive, job: Job) -> None:
    """Set job.cancel when the client disconnects (the request body is read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel.set()
            return
