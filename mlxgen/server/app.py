"""The Starlette app and its uvicorn runner.

Why Starlette + uvicorn: both are small, maintained ASGI building blocks (Starlette is what
FastAPI is built on). Streaming responses are async generators, the raw ASGI `receive` tells us
when a client disconnects, and nothing else (validation frameworks, ORMs) comes along."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from .. import settings
from . import ollama_api, openai_api
from .state import Server, ServerConfig


def build_app(server: Server) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(server.worker.stop)

    async def root(request: Request):
        return PlainTextResponse("mlxgen is running (Ollama and OpenAI compatible)")

    async def memory(request: Request):
        return JSONResponse(server.memory())

    routes = [Route("/", root, methods=["GET", "HEAD"]),
              Route("/mlxgen/memory", memory, methods=["GET"])]
    routes += ollama_api.routes(server) + openai_api.routes(server)
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return app


def serve(host: str, port: int, config: ServerConfig, log_level: str = "info") -> None:
    import uvicorn

    settings.validate_all()
    server = Server(config)
    # The --models load before the port opens; a bad name is an mlxgen error, not a traceback.
    asyncio.run(server.preload())
    uvicorn.run(build_app(server), host=host, port=port, log_level=log_level.lower(),
                timeout_graceful_shutdown=5)
