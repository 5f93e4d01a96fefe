"""Ollama's API (what many desktop apps speak): /api/chat and /api/generate with base64 images,
NDJSON streaming, `format` (json or a JSON schema), `options` and `keep_alive`; /api/tags, /api/ps,
/api/show, /api/pull, /api/delete, /api/version. Which model a request names is server/pool.py's."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from ..runtime.generation import TurnStats
from . import limits
from .limits import RequestError

VERSION = "0.12.0"  # the Ollama API version whose shapes these follow
DONE_REASON = {"stop": "stop", "length": "length", "context": "length", "cancelled": "stop", "error": "stop"}


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


def parse_chat(body, max_images: int) -> tuple[list[dict], dict, bool, object]:
    """(messages, sampling, stream, keep_alive or None)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
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
    return messages, _options(body), _stream(body), body.get("keep_alive")


def parse_generate(body, max_images: int) -> tuple[list[dict], dict, bool, object]:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    prompt, system = body.get("prompt", ""), body.get("system")
    if not isinstance(prompt, str) or not (system is None or isinstance(system, str)):
        raise RequestError(400, "'prompt' and 'system' must be strings", "prompt")
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    parts = _images(body.get("images"), "images", max_images, [0])
    messages.append({"role": "user", "content": parts + [{"type": "text", "text": prompt}]})
    limits.check_messages(messages)
    return messages, _options(body), _stream(body), body.get("keep_alive")


def parse_pull(body) -> tuple[str, str, str, bool]:
    """(source, store name, types, stream) of an /api/pull: `model` is a checkpoint folder or a repo id
    in the local Hugging Face cache (the server never downloads), `name` the store name (default: the
    source's last part), `quant` the types (default Q4_K_M)."""
    from ..model_store import check_name
    if not isinstance(body, dict) or not isinstance(body.get("model", body.get("name")), str):
        raise RequestError(400, "'model' must name a checkpoint folder or a repo id in the local Hugging Face cache")
    source = body.get("model", body.get("name"))
    name, quant = body.get("as", source.rstrip("/").split("/")[-1]), body.get("quant", "Q4_K_M")
    if not isinstance(name, str) or not isinstance(quant, str):
        raise RequestError(400, "'as' and 'quant' must be strings")
    try:
        check_name(name.partition(":")[0])
    except Exception as e:
        raise RequestError(400, str(e)) from None
    return source, name.partition(":")[0], quant, _stream(body)


class PullProgress:
    """The converter's progress as Ollama's pull statuses ({status, digest, total, completed})."""

    def __init__(self, post):
        self.post, self.name, self.total = post, "", 0

    def phase(self, name: str, total: int, unit: str) -> None:
        self.name, self.total = name, total
        self.post({"status": name, "digest": name, "total": total, "completed": 0})

    def advance(self, completed: int) -> None:
        self.post({"status": self.name, "digest": self.name, "total": self.total, "completed": completed})

    def file_done(self, entry, reused: bool) -> None:
        self.post({"status": f"{'kept' if reused else 'wrote'} {entry.file}"})

    def note(self, text: str) -> None:
        self.post({"status": f"note: {text}"})


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


def tag(name: str, size: int, digest: str, details: dict) -> dict:
    return {"name": name, "model": name, "modified_at": now(), "size": size, "digest": digest, "details": details}


def running(name: str, size: int, digest: str, details: dict, n_ctx: int, on_gpu: bool, expires: float | None,
            slots: tuple[int, int] = (1, 0)) -> dict:
    """An /api/ps entry; ``expires`` is a Unix time, None for never (a single-model server's model);
    ``slots``: (conversations it decodes at once, how many are busy) — ours, Ollama has no such field."""
    when = "9999-12-31T23:59:59Z" if expires is None else \
        datetime.fromtimestamp(expires, timezone.utc).isoformat().replace("+00:00", "Z")
    return {"name": name, "model": name, "size": size, "digest": digest, "details": details, "expires_at": when,
            "size_vram": size if on_gpu else 0, "context_length": n_ctx, "slots": slots[0], "slots_busy": slots[1]}
