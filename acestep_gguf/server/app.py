"""The HTTP face: OpenAI and Ollama APIs and the chat page over a ModelPool (one model, or the whole
store: pool.py), on Starlette.

Every request passes guard.Guard first (Host, Origin, content type, API key, declared size); then its
cost is bounded before any work (limits.py: text, messages, stops, schemas; body bytes per request
and in flight together; decoded image bytes, one picture decoded at a time). Image URLs are refused,
nothing is fetched. A bad request never reaches the model. docs/security.md lists the promises."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from importlib import resources

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..errors import AcestepGGUFError, ContextFullError
from . import limits, ollama_api, openai_api
from .engine import Engine, Result
from .guard import Guard, error_for
from .limits import RequestError
from .pool import FOREVER, ModelPool


@dataclass
class Settings:
    host: str = "127.0.0.1"
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)
    max_body_bytes: int = 48 << 20
    max_bodies_bytes: int = 192 << 20  # request bodies being received at once, together
    body_timeout_s: float = 30.0  # to receive a whole body once its headers have come
    max_images: int = 8
    max_image_bytes: int = 16 << 20
    max_decoded_image_bytes: int = 100 << 20  # one picture as decoded pixels (a 25-megapixel photo)


def openai_error(status: int, message: str, param=None, code=None) -> JSONResponse:
    return error_for("/v1", status, message, param, code)


class Gone(Exception):
    """The client went away while its request was being read: nobody to answer."""


class _Bodies:
    """Bytes of request bodies being received right now, across all requests."""

    def __init__(self):
        self.in_flight = 0


async def read_json(request: Request, settings: Settings, bodies: _Bodies):
    body = bytearray()

    async def receive() -> None:
        async for chunk in request.stream():
            if len(body) + len(chunk) > settings.max_body_bytes:
                raise RequestError(413, f"request body over the {settings.max_body_bytes} byte limit", None,
                                   "request_too_large")
            if bodies.in_flight + len(chunk) > settings.max_bodies_bytes:
                raise RequestError(503, "the server is receiving too many large requests at once; try again",
                                   None, "server_busy")
            bodies.in_flight += len(chunk)
            body.extend(chunk)

    try:
        await asyncio.wait_for(receive(), settings.body_timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {settings.body_timeout_s:g} s", None,
                           "request_timeout") from None
    except ClientDisconnect:
        raise Gone() from None
    finally:
        bodies.in_flight -= len(body)
    try:
        return json.loads(bytes(body))
    except (ValueError, RecursionError):  # bad JSON, deep nesting, a number past Python's digit limit
        raise RequestError(400, "the request body is not valid JSON", None, "invalid_json") from None


def check_image_sizes(messages: list[dict], settings: Settings) -> None:
    for m in messages:
        for part in m["content"]:
            if part["type"] == "image":
                payload = part["image"].partition(",")[2]
                if len(payload) * 3 // 4 > settings.max_image_bytes:
                    raise RequestError(413, f"an image is over the {settings.max_image_bytes} byte limit", "messages",
                                       "image_too_large")


async def prepared(engine: Engine, messages: list[dict], sampling: dict, settings: Settings,
                   decoding: asyncio.Lock, schema_param: str) -> list[dict]:
    """Pictures decoded (one request at a time: decoded pixels are the big cost) and the JSON schema
    compiled, both off the event loop."""
    check_image_sizes(messages, settings)
    schema = sampling.pop("schema", None)
    if schema is not None:
        sampling["grammar"] = await asyncio.to_thread(limits.grammar, schema, schema_param)
    try:
        async with decoding:
            return await asyncio.to_thread(engine.prepare, messages, settings.max_decoded_image_bytes)
    except AcestepGGUFError as e:
        raise RequestError(400, str(e), "messages", "invalid_image") from None


def context_message(e: ContextFullError, n_ctx: int) -> str:
    return f"{e} (the server runs with --ctx {n_ctx}: shorten the conversation or restart it with a larger --ctx)"


def engine_stats(engine: Engine) -> dict:
    store = engine.store
    return {"requests": engine.requests, "waiting": engine.waiting, "dropped": engine.dropped,
            "images_encoded": engine.chat.images_encoded_total, "slots": len(engine.slots),
            "slots_busy": engine.busy, "decode_steps": engine.counters.steps, "decoded_tokens": engine.counters.rows,
            "state_cache": {"entries": len(store.entries), "bytes": store.n_bytes, "hits": store.hits,
                            "misses": store.misses, "dropped": store.dropped}}


def model_facts(row, with_template: bool = False):
    """(bytes, digest, details[, chat template]) of a catalog row, from its manifest and GGUF header:
    nothing is loaded."""
    from ..manifest import Manifest
    from ..runtime.model_files import read_fields
    _, name, folder, quant = row
    manifest = Manifest.read(folder)
    lang, vision = manifest.pick("language", quant), manifest.pick("vision", None)
    details = {"format": "gguf", "family": manifest.source.get("family", ""), "families": None,
               "quantization_level": quant, "parameter_size": "", "parent_model": ""}
    facts = (lang.bytes + vision.bytes, lang.sha256, details)
    if with_template:
        return facts + (read_fields(folder / lang.file, "language model").get("tokenizer.chat_template", ""),)
    return facts


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


def create_app(pool: ModelPool, settings: Settings) -> Starlette:
    bodies, decoding = _Bodies(), asyncio.Lock()
    single = pool.fixed is not None

    def public_id(row) -> str:
        return row[1] if single else row[0]  # one model: its plain name, as before; a store: name:TYPE

    def ollama_id(row) -> str:
        return f"{row[1]}:latest" if single else row[0]

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": pool.fixed[0] if single else None,
                             "models": len(pool.catalog())})

    async def stats(request: Request):
        per = {e.id: engine_stats(e.engine) for e in pool.loaded()}
        total = {k: sum(v[k] for v in per.values()) for k in ("requests", "waiting", "dropped", "images_encoded",
                                                             "slots", "slots_busy", "decode_steps", "decoded_tokens")}
        cache = {k: sum(v["state_cache"][k] for v in per.values()) for k in ("entries", "bytes", "hits", "misses",
                                                                             "dropped")}
        return JSONResponse({**total, "state_cache": cache, "models": per})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": public_id(row), "object": "model", "created": 0,
                                                         "owned_by": "acestep-gguf"} for row in pool.catalog()]})

    async def admit(request: Request, parse, schema_param: str, keep_alive_given: bool):
        """A generation request parsed, its model held (loaded if need be) and its pictures and schema
        prepared: (body, messages, sampling, stream, the parser's fourth value, engine, the stack that
        releases the model). On any failure the model is released before the error goes up."""
        stack = contextlib.AsyncExitStack()
        try:
            body = await read_json(request, settings, bodies)
            messages, sampling, stream, extra = parse(body, settings.max_images)
            engine = await stack.enter_async_context(pool.use(body.get("model"), extra if keep_alive_given else None))
            messages = await prepared(engine, messages, sampling, settings, decoding, schema_param)
            return body, messages, sampling, stream, extra, engine, stack
        except BaseException:
            await stack.aclose()
            raise

    async def chat_completions(request: Request):
        try:
            body, messages, sampling, stream, include_usage, engine, stack = await admit(
                request, openai_api.parse_request, "response_format", False)
        except RequestError as e:
            return openai_error(e.status, e.message, e.param, e.code)
        except Gone:
            return Response(status_code=400)
        ids = openai_api.Ids(body["model"])
        if not stream:
            try:
                result = await collect(request, engine, messages, sampling)
            except ContextFullError as e:
                return openai_error(400, context_message(e, engine.n_ctx), "messages", "context_length_exceeded")
            except AcestepGGUFError as e:
                return openai_error(400, str(e), None, "invalid_request")
            finally:
                await stack.aclose()
            return JSONResponse(ids.completion(result.text, result.stats))

        async def events():
            async with stack:
                result = Result()
                yield ids.chunk({"role": "assistant", "content": ""})
                try:
                    async for piece in engine.generate(messages, sampling, result):
                        yield ids.chunk({"content": piece})
                except AcestepGGUFError as e:
                    full = isinstance(e, ContextFullError)
                    yield json.dumps({"error": {"message": context_message(e, engine.n_ctx) if full else str(e),
                                                "type": "invalid_request_error", "param": None,
                                                "code": "context_length_exceeded" if full else None}})
                    yield "[DONE]"
                    return
                yield ids.chunk({}, openai_api.FINISH.get(result.stats.finish_reason, "stop"))
                if include_usage:
                    yield ids.usage_chunk(result.stats)
                yield "[DONE]"
        # on shutdown the engine cancels the running turn: the stream gets its final chunk and [DONE]
        # within the grace period instead of being cut (sse-starlette's default)
        return EventSourceResponse(events(), ping=15, shutdown_grace_period=4)

    async def ollama(request: Request, parse, shape):
        try:
            body, messages, sampling, stream, _, engine, stack = await admit(request, parse, "format", True)
        except RequestError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        except Gone:
            return Response(status_code=400)
        started = time.perf_counter()
        model = body["model"]
        if not stream:
            try:
                result = await collect(request, engine, messages, sampling)
            except AcestepGGUFError as e:
                return JSONResponse({"error": context_message(e, engine.n_ctx) if isinstance(e, ContextFullError)
                                     else str(e)}, status_code=400)
            finally:
                await stack.aclose()
            return JSONResponse(ollama_api.final(model, result.stats, started, shape(result.text)))

        async def lines():
            async with stack:
                result = Result()
                try:
                    async for piece in engine.generate(messages, sampling, result):
                        yield json.dumps({"model": model, "created_at": ollama_api.now(), **shape(piece),
                                          "done": False}) + "\n"
                except AcestepGGUFError as e:
                    yield json.dumps({"error": context_message(e, engine.n_ctx) if isinstance(e, ContextFullError)
                                      else str(e)}) + "\n"
                    return
                yield json.dumps(ollama_api.final(model, result.stats, started, shape(""))) + "\n"
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def api_chat(request: Request):
        return await ollama(request, ollama_api.parse_chat, lambda text: {"message": {"role": "assistant", "content": text}})

    async def api_generate(request: Request):
        return await ollama(request, ollama_api.parse_generate, lambda text: {"response": text})

    async def api_tags(request: Request):
        return JSONResponse({"models": [ollama_api.tag(ollama_id(row), *model_facts(row)) for row in pool.catalog()]})

    async def api_ps(request: Request):
        now, wall = time.monotonic(), time.time()
        return JSONResponse({"models": [ollama_api.running(
            ollama_id((e.id, e.name)), e.bytes, model_facts((e.id, e.name, e.folder, e.quant))[1], e.engine.details,
            e.engine.n_ctx, e.engine.chat.n_gpu_layers > 0, None if e.expires == FOREVER else wall + e.expires - now,
            (len(e.engine.slots), e.engine.busy))
            for e in pool.loaded()]})

    async def api_show(request: Request):
        try:
            body = await read_json(request, settings, bodies)
            row = pool.lookup(body.get("model", body.get("name")) if isinstance(body, dict) else None)
        except RequestError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        except Gone:
            return Response(status_code=400)
        size, digest, details, template = model_facts(row, with_template=True)
        return JSONResponse({"modelfile": f"# served by acestep-gguf {__version__}", "parameters": "",
                             "template": template, "details": details,
                             "model_info": {"general.architecture": details.get("family", "")},
                             "capabilities": ["completion", "vision"]})

    async def api_delete(request: Request):
        try:
            body = await read_json(request, settings, bodies)
            if single:
                raise RequestError(400, "this server serves one model; remove models with `acestep-gguf rm`")
            row = pool.lookup(body.get("model", body.get("name")) if isinstance(body, dict) else None)
            stored = pool.store.get(row[1])
            if len(stored.types()) > 1 and body.get("model", body.get("name")) == row[0]:
                raise RequestError(400, f"{row[1]} has {', '.join(stored.types())}: delete removes the whole model; "
                                   f"name it as '{row[1]}'")
            for other in [r for r in pool.catalog() if r[1] == row[1]]:
                if not await pool.unload(other[0]):
                    raise RequestError(409, f"{other[0]} is answering a request; try again when it is done")
            await asyncio.to_thread(pool.store.remove, row[1])
        except RequestError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        except Gone:
            return Response(status_code=400)
        except AcestepGGUFError as e:
            return JSONResponse({"error": str(e)}, status_code=409)
        return JSONResponse({})

    async def api_pull(request: Request):
        try:
            body = await read_json(request, settings, bodies)
            if single:
                raise RequestError(400, "this server serves one model; start `serve` without -m to serve the store")
            source, name, quant, stream = ollama_api.parse_pull(body)
        except RequestError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        except Gone:
            return Response(status_code=400)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        progress = ollama_api.PullProgress(lambda status: loop.call_soon_threadsafe(queue.put_nowait, status))

        def work():
            try:
                pool.store.pull(source, name, quant=quant, progress=progress)
                return None
            except AcestepGGUFError as e:
                return str(e)

        task = asyncio.ensure_future(asyncio.to_thread(work))
        if not stream:
            problem = await task
            return JSONResponse({"error": problem} if problem else {"status": "success"},
                                status_code=400 if problem else 200)

        async def statuses():
            yield json.dumps({"status": f"converting {source} into {name}"}) + "\n"
            while not (task.done() and queue.empty()):
                try:
                    yield json.dumps(await asyncio.wait_for(queue.get(), 0.5)) + "\n"
                except asyncio.TimeoutError:
                    continue
            problem = task.result()
            yield json.dumps({"error": problem} if problem else {"status": "success"}) + "\n"
        return StreamingResponse(statuses(), media_type="application/x-ndjson")

    async def api_version(request: Request):
        return JSONResponse({"version": ollama_api.VERSION})

    async def page(request: Request):
        return HTMLResponse(resources.files("acestep_gguf.server").joinpath("page.html").read_text(encoding="utf-8"))

    routes = [
        Route("/", page), Route("/health", health), Route("/stats", stats), Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/api/chat", api_chat, methods=["POST"]), Route("/api/generate", api_generate, methods=["POST"]),
        Route("/api/tags", api_tags), Route("/api/ps", api_ps), Route("/api/show", api_show, methods=["POST"]),
        Route("/api/delete", api_delete, methods=["DELETE"]), Route("/api/pull", api_pull, methods=["POST"]),
        Route("/api/version", api_version),
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
        finally:  # SIGTERM / Ctrl-C: keep the cached conversations for the next start, free the models
            await asyncio.to_thread(pool.close)

    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                     exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error})
