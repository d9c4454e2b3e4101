"""Ollama's /api/*: generate, chat (NDJSON streams or one JSON object), tags, show, ps,
version. Errors are {"error": "..."} with 400 / 404 / 500, as Ollama answers."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .. import __version__
from .engine import Done, Token
from .state import ApiError, Server, make_request, read_json, status_of

# Ollama's option names -> SamplingParams; options it has that do not apply here are accepted
# and ignored (num_ctx: the model's own context is used; num_gpu, num_thread, ...).
_OPTIONS = {"num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p",
            "top_k": "top_k", "min_p": "min_p", "repeat_penalty": "repetition_penalty",
            "repeat_last_n": "repetition_context_size", "seed": "seed", "stop": "stop"}
# Ollama's defaults (its docs' Modelfile parameters); num_predict -1: until eos or the context.
_DEFAULTS = {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1,
             "repetition_context_size": 64}
UNLIMITED = 1 << 30  # max_tokens for num_predict -1: generation then stops at the context


def error(e: BaseException) -> JSONResponse:
    status, _ = status_of(e)
    message = e.message if isinstance(e, ApiError) else str(e) if status < 500 else (
        f"internal error: {type(e).__name__}: {e}")
    return JSONResponse({"error": message}, status_code=status)


def sampling(options: Any) -> dict:
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ApiError(400, "options must be a JSON object.")
    out = dict(_DEFAULTS)
    for key, value in options.items():
        if key in _OPTIONS:
            out[_OPTIONS[key]] = value
    n = out.get("max_tokens")
    if n is None or (isinstance(n, int) and not isinstance(n, bool) and n < 0):
        out["max_tokens"] = UNLIMITED  # -1 (infinite) and -2 (fill the context) alike
    elif n == 0:
        raise ApiError(400, "num_predict 0 generates nothing; give -1 or a positive count.")
    last_n = out["repetition_context_size"]
    if last_n == 0:  # Ollama: 0 disables the penalty, -1 looks back over the whole context
        out["repetition_penalty"], out["repetition_context_size"] = None, 64
    elif last_n == -1:
        out["repetition_context_size"] = UNLIMITED
    if out.get("repetition_penalty") == 1:
        out["repetition_penalty"] = None
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _final(model: str, done: Done, extra: dict) -> dict:
    ns = lambda s: int(s * 1e9)
    return {"model": model, "created_at": _now(), **extra, "done": True,
            "done_reason": done.finish_reason or "stop",
            "total_duration": ns(done.total_s), "load_duration": ns(done.load_s),
            "prompt_eval_count": done.stats.prompt_tokens,
            "prompt_eval_duration": ns(done.prompt_s),
            "eval_count": done.stats.generation_tokens, "eval_duration": ns(done.eval_s),
            "mlxgen": {"cached_tokens": done.stats.cached_tokens}}


def routes(server: Server) -> list[Route]:
    async def respond(request: Request, body: dict, prompt, chat: bool):
        stream = body.get("stream", True)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false.")
        if body.get("format"):
            raise ApiError(400, "format (JSON mode) is not supported by mlxgen serve.")
        if body.get("images"):
            raise ApiError(400, "images are not supported by mlxgen serve (text models only).")
        model = body.get("model")
        req = make_request(server, model, prompt, sampling(body.get("options")),
                           body.get("keep_alive"), body)
        gen = await server.engine.start(req, request.receive)

        def piece(text: str) -> dict:
            return ({"message": {"role": "assistant", "content": text}} if chat
                    else {"response": text})

        if not stream:
            text, done = await gen.collect()
            return JSONResponse(_final(model, done, piece(text)))

        async def lines():
            try:
                async for item in gen.events():
                    if isinstance(item, Token):
                        if item.text:
                            yield json.dumps({"model": model, "created_at": _now(),
                                              **piece(item.text), "done": False}) + "\n"
                    else:
                        yield json.dumps(_final(model, item, piece(""))) + "\n"
            except Exception as e:  # noqa: BLE001 - after the headers, errors go in-band
                yield json.dumps({"error": str(e)}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def generate(request: Request):
        try:
            body = await read_json(request)
            prompt = body.get("prompt")
            if prompt is not None and not isinstance(prompt, str):
                raise ApiError(400, "prompt must be a string.")
            if body.get("template") or body.get("suffix") or body.get("context"):
                raise ApiError(400, "template, suffix and context are not supported by mlxgen "
                                    "serve; send the whole prompt (raw: true) or use /api/chat.")
            system = body.get("system")
            if prompt and not body.get("raw"):
                # As Ollama: the prompt goes through the model's template as a user message.
                tokenizer = await _tokenizer(server, body.get("model"))
                if tokenizer is not None and tokenizer.chat_template:
                    prompt = ([{"role": "system", "content": system}] if system else []) + [
                        {"role": "user", "content": prompt}]
            return await respond(request, body, prompt or None, chat=False)
        except Exception as e:  # noqa: BLE001 - every error gets Ollama's error body
            return error(e)

    async def chat(request: Request):
        try:
            body = await read_json(request)
            messages = body.get("messages")
            if messages is not None and not isinstance(messages, list):
                raise ApiError(400, "messages must be a list of {role, content} objects.")
            if body.get("tools"):
                raise ApiError(400, "tools are not supported by mlxgen serve.")
            messages = [{"role": m.get("role"), "content": m.get("content")}
                        if isinstance(m, dict) else m for m in messages or []]
            return await respond(request, body, messages or None, chat=True)
        except Exception as e:  # noqa: BLE001
            return error(e)

    async def tags(request: Request):
        return JSONResponse({"models": [_describe(n, e) for n, e in server.listed().items()]})

    async def ps(request: Request):
        out = []
        for e in server.pool.loaded():
            left = e.expires_at - time.monotonic()
            expires = (datetime.now(timezone.utc) + timedelta(seconds=left) if left < 1e9
                       else datetime(2318, 1, 1, tzinfo=timezone.utc))  # forever, as Ollama
            out.append({**_describe(e.name, e), "expires_at": expires.isoformat(),
                        "size_vram": 0})
        return JSONResponse({"models": out})

    async def show(request: Request):
        try:
            body = await read_json(request)
            name = body.get("model") or body.get("name")
            make_request(server, name, None, {}, None, {})
            from ..info import describe

            def info():
                entry, _ = server.pool.acquire(name)
                try:
                    return describe(entry.model, entry.tokenizer), entry
                finally:
                    server.pool.release(entry, entry.keep_alive)

            facts, entry = await server.on_worker(info)
            return JSONResponse({
                "modelfile": "", "parameters": "", "template": entry.tokenizer.chat_template or "",
                "details": _details(entry), "model_info": {k: str(v) for k, v in facts.items()},
                "capabilities": ["completion"]})
        except Exception as e:  # noqa: BLE001
            return error(e)

    async def version(request: Request):
        return JSONResponse({"version": __version__})

    return [Route("/api/generate", generate, methods=["POST"]),
            Route("/api/chat", chat, methods=["POST"]),
            Route("/api/tags", tags, methods=["GET"]),
            Route("/api/ps", ps, methods=["GET"]),
            Route("/api/show", show, methods=["POST"]),
            Route("/api/version", version, methods=["GET"])]


async def _tokenizer(server: Server, name: Any):
    """The tokenizer of a model (loading it), or None when the name is bad (the request then
    fails with the usual error)."""
    if not isinstance(name, str) or not name:
        return None
    entry = next((e for e in server.pool.loaded() if e.name == name), None)
    if entry is not None:
        return entry.tokenizer

    def get():
        entry, _ = server.pool.acquire(name)
        server.pool.release(entry, entry.keep_alive)
        return entry.tokenizer

    return await server.on_worker(get)


def _details(entry) -> dict:
    info = getattr(entry.model, "info", None) if entry else None
    quant = (info.quantization or {}) if info else {}
    return {"format": info.format if info else "gguf", "family": entry.model.model_type
            if entry else "", "parameter_size": "", "quantization_level": str(
                quant.get("bits", "")) if isinstance(quant, dict) else ""}


def _describe(name: str, entry) -> dict:
    return {"name": name, "model": name, "modified_at": _now(),
            "size": entry.nbytes if entry else 0,
            "digest": entry.fingerprint if entry else "", "details": _details(entry)}
