"""OpenAI's /v1/chat/completions, /v1/completions (SSE `data:` events ending in `[DONE]`, or one
JSON object) and /v1/models. Errors are {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .engine import Done, Token
from .state import ApiError, Server, make_request, read_json, status_of

# Parameters the API has that mlxgen does not implement: refused when set to a non-default.
_UNSUPPORTED = {"n": 1, "logprobs": False, "top_logprobs": None, "presence_penalty": 0,
                "frequency_penalty": 0, "logit_bias": None, "tools": None, "functions": None,
                "response_format": None, "best_of": 1, "echo": False, "suffix": None}


def error(e: BaseException) -> JSONResponse:
    status, code = status_of(e)
    kind = {400: "invalid_request_error", 404: "invalid_request_error",
            413: "invalid_request_error"}.get(status, "server_error")
    message = e.message if isinstance(e, ApiError) else str(e) if status < 500 else (
        f"internal error: {type(e).__name__}: {e}")
    param = getattr(e, "param", None) or ("model" if status == 404 else None)
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}}, status_code=status)


def sampling(body: dict) -> dict:
    for key, default in _UNSUPPORTED.items():
        if body.get(key) not in (None, default):
            raise ApiError(400, f"{key} is not supported by mlxgen serve (only {default!r}).",
                           param=key)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    out = {"temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
           "max_tokens": 1 << 30 if max_tokens is None else max_tokens,
           "stop": body.get("stop"), "seed": body.get("seed")}
    for key in ("top_k", "min_p", "repetition_penalty"):  # extensions mlx-lm's server has too
        if body.get(key) is not None:
            out[key] = body[key]
    for key in ("temperature", "top_p"):
        if out[key] is None:
            del out[key]
    return out


def _content(message: Any) -> dict:
    """An OpenAI message -> {role, content} with text content (a list of text parts joined)."""
    if not isinstance(message, dict):
        raise ApiError(400, "each message must be an object with role and content.",
                       param="messages")
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise ApiError(400, "only text content parts are supported.", param="messages")
        content = "".join(str(p.get("text", "")) for p in content)
    role = "system" if message.get("role") == "developer" else message.get("role")
    return {"role": role, "content": "" if content is None else content}


def _usage(done: Done) -> dict:
    s = done.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generation_tokens,
            "total_tokens": s.prompt_tokens + s.generation_tokens,
            "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}


def routes(server: Server) -> list[Route]:
    async def complete(request: Request, chat: bool):
        try:
            body = await read_json(request)
            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise ApiError(400, "messages must be a non-empty list.", param="messages")
                prompt: Any = [_content(m) for m in messages]
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                if not isinstance(prompt, str) or not prompt:
                    raise ApiError(400, "prompt must be a non-empty string.", param="prompt")
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise ApiError(400, "stream must be true or false.", param="stream")
            model = body.get("model")
            options = body.get("stream_options") or {}
            req = make_request(server, model, prompt, sampling(body), None, body)
            gen = await server.engine.start(req, request.receive)
        except Exception as e:  # noqa: BLE001 - every error gets OpenAI's error body
            return error(e)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": ident, "object": kind, "created": created, "model": model}

        def choice(text: str | None, finish: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if delta:
                return {"index": 0, "delta": {} if text is None else {"content": text},
                        "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text},
                    "finish_reason": finish}

        if not stream:
            try:
                text, done = await gen.collect()
            except Exception as e:  # noqa: BLE001
                return error(e)
            return JSONResponse({**head, "choices": [choice(text, done.finish_reason or "stop",
                                                            False)], "usage": _usage(done)})

        chunk_head = {**head, "object": "chat.completion.chunk" if chat else kind}

        def event(data: dict) -> str:
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            try:
                if chat:
                    yield event({**chunk_head, "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": ""},
                         "finish_reason": None}]})
                async for item in gen.events():
                    if isinstance(item, Token):
                        if item.text:
                            yield event({**chunk_head, "choices": [choice(item.text, None, True)]})
                        continue
                    yield event({**chunk_head, "choices": [
                        choice(None if chat else "", item.finish_reason or "stop", True)]})
                    if options.get("include_usage"):
                        yield event({**chunk_head, "choices": [], "usage": _usage(item)})
                yield "data: [DONE]\n\n"
            except Exception as e:  # noqa: BLE001 - after the headers, errors go in-band
                yield event({"error": {"message": str(e), "type": "server_error", "param": None,
                                       "code": None}})

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    async def completions(request: Request):
        return await complete(request, chat=False)

    async def models(request: Request):
        now = int(time.time())
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": now, "owned_by": "mlxgen"}
            for n in server.listed()]})

    return [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"])]
