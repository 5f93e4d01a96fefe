"""Ollama's API (what many desktop apps speak): /api/chat and /api/generate with base64 images,
NDJSON streaming, `format` (json or a JSON schema) and `options`; /api/tags, /api/show, /api/version."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from ..runtime.generation import TurnStats
from . import limits
from .limits import RequestError

VERSION = "0.12.0"  # the Ollama API version whose shapes these follow
DONE_REASON = {"stop": "stop", "length": "length", "context": "length", "cancelled": "stop", "error": "stop"}


def served_name(model, served: str) -> None:
    """Ollama clients say "name" or "name:tag"."""
    if not isinstance(model, str) or model.split(":")[0] not in (served, "default"):
        raise RequestError(404, f"model '{model}' not found (this server serves '{served}')", "model", "model_not_found")


def _images(raw, where: str, max_images: int, count: list) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
        raise RequestError(400, f"{where}: images must be a list of base64 strings", where)
    count[0] += len(raw)
    if count[0] > max_images:
        raise RequestError(400, f"more than {max_images} images in one request", where)
    parts = []
    for x in raw:
        if x.startswith(("http://", "https://", "file:")):
            raise RequestError(400, f"{where}: image URLs are never fetched; send base64 data", where)
        parts.append({"type": "image", "image": x if x.startswith("data:") else "data:image/*;base64," + x})
    return parts


def _options(body: dict) -> dict:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, "'options' must be an object", "options")
    sampling = {}
    for key, name, lo, hi, kind in (("temperature", "temperature", 0, 2, (int, float)), ("top_p", "top_p", 0, 1, (int, float)),
                                    ("num_predict", "max_tokens", 1, 1 << 20, (int,)), ("seed", "seed", 0, (1 << 32) - 1, (int,))):
        value = options.get(key)
        if value is None or (key == "num_predict" and value == -1):
            continue
        if type(value) not in kind or not lo <= value <= hi:
            raise RequestError(400, f"options.{key} must be from {lo} to {hi}", f"options.{key}")
        sampling[name] = value
    stop = limits.stops(options.get("stop"), "options.stop")
    if stop is not None:
        sampling["stop"] = stop
    if sampling.get("top_p") == 0:
        sampling["top_p"] = 1e-6
    fmt = body.get("format")
    if fmt == "json" or isinstance(fmt, dict):
        sampling["schema"] = fmt  # compiled off the event loop (limits.grammar)
    elif fmt not in (None, ""):
        raise RequestError(400, "format must be \"json\" or a JSON schema object", "format")
    return sampling


def parse_chat(body, served: str, max_images: int) -> tuple[list[dict], dict, bool]:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    served_name(body.get("model"), served)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    count, messages = [0], []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content", ""), str):
            raise RequestError(400, f"messages[{i}]: needs a role (system, user, assistant) and string content", "messages")
        parts = _images(m.get("images"), f"messages[{i}].images", max_images, count)
        messages.append({"role": m["role"], "content": parts + [{"type": "text", "text": m.get("content", "")}]})
    if messages[-1]["role"] != "user":
        raise RequestError(400, "the last message must be from the user", "messages")
    limits.check_messages(messages)
    return messages, _options(body), _stream(body)


def parse_generate(body, served: str, max_images: int) -> tuple[list[dict], dict, bool]:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    served_name(body.get("model"), served)
    prompt, system = body.get("prompt", ""), body.get("system")
    if not isinstance(prompt, str) or not (system is None or isinstance(system, str)):
        raise RequestError(400, "'prompt' and 'system' must be strings", "prompt")
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    parts = _images(body.get("images"), "images", max_images, [0])
    messages.append({"role": "user", "content": parts + [{"type": "text", "text": prompt}]})
    limits.check_messages(messages)
    return messages, _options(body), _stream(body)


def _stream(body: dict) -> bool:
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false", "stream")
    return stream


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def final(model: str, stats: TurnStats, started: float, extra: dict) -> dict:
    total = int((time.perf_counter() - started) * 1e9)
    return {"model": model, "created_at": now(), **extra, "done": True, "done_reason": DONE_REASON.get(stats.finish_reason, "stop"),
            "total_duration": total, "prompt_eval_count": stats.evaluated_positions,
            "prompt_eval_duration": int(stats.time_to_first_token_s * 1e9), "eval_count": stats.completion_tokens,
            "eval_duration": int(stats.decode_s * 1e9),
            "acestep": {"cached_tokens": stats.reused_positions, "images_encoded": stats.images_encoded}}


def tags(name: str, size: int, digest: str, details: dict) -> dict:
    return {"models": [{"name": f"{name}:latest", "model": f"{name}:latest", "modified_at": now(), "size": size,
                        "digest": digest, "details": details}]}


def ps(name: str, size: int, digest: str, details: dict, n_ctx: int, on_gpu: bool) -> dict:
    """/api/ps: the one model this server holds; it stays loaded until the server stops (no expiry)."""
    return {"models": [{"name": f"{name}:latest", "model": f"{name}:latest", "size": size, "digest": digest,
                        "details": details, "expires_at": "9999-12-31T23:59:59Z", "size_vram": size if on_gpu else 0,
                        "context_length": n_ctx}]}
