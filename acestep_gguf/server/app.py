"""The HTTP face: OpenAI and Ollama APIs and the chat page over one Engine, on Starlette.

Safe by default: with an API key every endpoint but /health and the page itself needs
`Authorization: Bearer KEY`; when bound to loopback, a request whose Host header is not a loopback
name is refused (DNS rebinding); no CORS unless origins are given; body, image-count and image-size
caps; image URLs are refused, nothing is fetched. A bad request never reaches the model."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from dataclasses import dataclass, field
from importlib import resources

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..errors import AcestepGGUFError, ContextFullError
from . import ollama_api, openai_api
from .engine import Engine, Result
from .openai_api import RequestError

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


@dataclass
class Settings:
    host: str = "127.0.0.1"
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 48 << 20
    max_images: int = 8
    max_image_bytes: int = 16 << 20
    model_bytes: int = 0
    model_digest: str = ""
    details: dict = field(default_factory=dict)


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES or host.startswith("127.")


def openai_error(status: int, message: str, param=None, code=None, kind=None) -> JSONResponse:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    if status == 401:
        kind = "authentication_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def error_for(path: str, status: int, message: str, param=None, code=None) -> JSONResponse:
    if path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)  # Ollama's shape
    return openai_error(status, message, param, code)


class Guard:
    """ASGI middleware: Host check (DNS rebinding), API key, declared body size."""

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        problem = None
        host = headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        if is_loopback(self.settings.host) and name not in LOOPBACK_NAMES and not name.startswith("127."):
            problem = (403, f"Host '{host}' is not a loopback name; this server only answers requests addressed to "
                            "localhost", "host_not_allowed")
        elif self.settings.api_key and path not in ("/health", "/") and scope.get("method") != "OPTIONS":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.settings.api_key}".encode()):
                problem = (401, "missing or wrong API key (send Authorization: Bearer KEY)", "invalid_api_key")
        length = headers.get("content-length")
        if problem is None and length and (not length.isdigit() or int(length) > self.settings.max_body_bytes):
            problem = (413, f"request body over the {self.settings.max_body_bytes} byte limit", "request_too_large")
        if problem is not None:
            response = error_for(path, problem[0], problem[1], code=problem[2])
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


async def read_json(request: Request, settings: Settings):
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > settings.max_body_bytes:
            raise RequestError(413, f"request body over the {settings.max_body_bytes} byte limit", None, "request_too_large")
    try:
        return json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise RequestError(400, "the request body is not valid JSON", None, "invalid_json") from None


def check_image_sizes(messages: list[dict], settings: Settings) -> None:
    for m in messages:
        for part in m["content"]:
            if part["type"] == "image":
                payload = part["image"].partition(",")[2]
                if len(payload) * 3 // 4 > settings.max_image_bytes:
                    raise RequestError(413, f"an image is over the {settings.max_image_bytes} byte limit", "messages",
                                       "image_too_large")


async def prepared(engine: Engine, messages: list[dict], settings: Settings) -> list[dict]:
    check_image_sizes(messages, settings)
    try:
        return await asyncio.to_thread(engine.prepare, messages)
    except AcestepGGUFError as e:
        raise RequestError(400, str(e), "messages", "invalid_image") from None


async def watch_disconnect(request: Request, result: Result, done: asyncio.Event) -> None:
    """A non-streaming client that goes away gives up its request (its generation, or its place in line)."""
    while not done.is_set():
        if await request.is_disconnected():
            result.abandon()
            return
        await asyncio.sleep(0.2)


async def collect(request: Request, engine: Engine, messages, sampling) -> Result:
    result, done = Result(), asyncio.Event()
    watcher = asyncio.create_task(watch_disconnect(request, result, done))
    try:
        async for _ in engine.generate(messages, sampling, result):
            pass
    finally:
        done.set()
        watcher.cancel()
    return result


def create_app(engine: Engine, settings: Settings) -> Starlette:
    name = engine.name

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": name})

    async def stats(request: Request):
        return JSONResponse({"requests": engine.requests, "waiting": engine.waiting, "dropped": engine.dropped,
                             "images_encoded": engine.chat.images_encoded_total,
                             "state_cache": {"entries": len(engine.store.entries), "hits": engine.store.hits,
                                             "misses": engine.store.misses}})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                         "owned_by": "acestep-gguf"}]})

    async def chat_completions(request: Request):
        try:
            body = await read_json(request, settings)
            messages, sampling, stream, include_usage = openai_api.parse_request(body, name, settings.max_images)
            messages = await prepared(engine, messages, settings)
        except RequestError as e:
            return openai_error(e.status, e.message, e.param, e.code)
        ids = openai_api.Ids(name)
        if not stream:
            try:
                result = await collect(request, engine, messages, sampling)
            except ContextFullError as e:
                return openai_error(400, str(e), "messages", "context_length_exceeded")
            except AcestepGGUFError as e:
                return openai_error(400, str(e), None, "invalid_request")
            return JSONResponse(ids.completion(result.text, result.stats))

        async def events():
            result = Result()
            yield ids.chunk({"role": "assistant", "content": ""})
            try:
                async for piece in engine.generate(messages, sampling, result):
                    yield ids.chunk({"content": piece})
            except AcestepGGUFError as e:
                yield json.dumps({"error": {"message": str(e), "type": "invalid_request_error", "param": None,
                                            "code": "context_length_exceeded" if isinstance(e, ContextFullError) else None}})
                yield "[DONE]"
                return
            yield ids.chunk({}, openai_api.FINISH.get(result.stats.finish_reason, "stop"))
            if include_usage:
                yield ids.usage_chunk(result.stats)
            yield "[DONE]"
        return EventSourceResponse(events(), ping=15)

    async def ollama(request: Request, parse, shape):
        try:
            body = await read_json(request, settings)
            messages, sampling, stream = parse(body, name, settings.max_images)
            messages = await prepared(engine, messages, settings)
        except RequestError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        started = time.perf_counter()
        model = body["model"]
        if not stream:
            try:
                result = await collect(request, engine, messages, sampling)
            except AcestepGGUFError as e:
                return JSONResponse({"error": str(e)}, status_code=400)
            return JSONResponse(ollama_api.final(model, result.stats, started, shape(result.text)))

        async def lines():
            result = Result()
            try:
                async for piece in engine.generate(messages, sampling, result):
                    yield json.dumps({"model": model, "created_at": ollama_api.now(), **shape(piece), "done": False}) + "\n"
            except AcestepGGUFError as e:
                yield json.dumps({"error": str(e)}) + "\n"
                return
            yield json.dumps(ollama_api.final(model, result.stats, started, shape(""))) + "\n"
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def api_chat(request: Request):
        return await ollama(request, ollama_api.parse_chat, lambda text: {"message": {"role": "assistant", "content": text}})

    async def api_generate(request: Request):
        return await ollama(request, ollama_api.parse_generate, lambda text: {"response": text})

    async def api_tags(request: Request):
        return JSONResponse(ollama_api.tags(name, settings.model_bytes, settings.model_digest, settings.details))

    async def api_show(request: Request):
        try:
            body = await read_json(request, settings)
            ollama_api.served_name(body.get("model", body.get("name")) if isinstance(body, dict) else None, name)
        except RequestError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        return JSONResponse({"modelfile": f"# served by acestep-gguf {__version__}", "parameters": "",
                             "template": engine.chat.chat_template, "details": settings.details,
                             "model_info": {"general.architecture": settings.details.get("family", "")},
                             "capabilities": ["completion", "vision"]})

    async def api_version(request: Request):
        return JSONResponse({"version": ollama_api.VERSION})

    async def page(request: Request):
        return HTMLResponse(resources.files("acestep_gguf.server").joinpath("page.html").read_text(encoding="utf-8"))

    routes = [
        Route("/", page), Route("/health", health), Route("/stats", stats), Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/api/chat", api_chat, methods=["POST"]), Route("/api/generate", api_generate, methods=["POST"]),
        Route("/api/tags", api_tags), Route("/api/show", api_show, methods=["POST"]), Route("/api/version", api_version),
    ]
    middleware = [Middleware(Guard, settings=settings)]
    if settings.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))

    async def not_found(request: Request, exc):
        return error_for(request.url.path, 404, f"no such endpoint: {request.method} {request.url.path}", code="not_found")

    async def method_not_allowed(request: Request, exc):
        return error_for(request.url.path, 405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")

    async def server_error(request: Request, exc):
        return error_for(request.url.path, 500, "internal error (see the server log)", code="internal_error")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:  # SIGTERM / Ctrl-C: keep the cached conversation for the next start, free the model
            await asyncio.to_thread(engine.close)

    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                     exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error})
