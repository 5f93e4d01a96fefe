"""OpenAI's chat-completions API, translated to and from the engine: request checking (every field
typed and bounded, image URLs refused: nothing is fetched), response and stream-chunk shapes."""

from __future__ import annotations

import json
import time
import uuid

from ..runtime.generation import TurnStats
from . import limits
from .limits import RequestError


FINISH = {"stop": "stop", "length": "length", "context": "length", "cancelled": "stop", "error": "stop"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _number(body: dict, key: str, lo: float, hi: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return None
    kind_ok = type(value) is int if integer else type(value) in (int, float)
    if not kind_ok or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise RequestError(400, f"'{key}' must be {what} from {lo} to {hi}", key, "invalid_value")
    return value


def image_source(part: dict, where: str, max_images: int, count: list) -> str:
    """A data: URI (or raw base64) image; URLs are refused, never fetched."""
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise RequestError(400, f"{where}: image_url needs a url", where, "invalid_value")
    if not url.startswith("data:"):
        raise RequestError(400, f"{where}: only data: URIs are accepted; URLs (http, https, file) are never fetched",
                           where, "invalid_image_url")
    count[0] += 1
    if count[0] > max_images:
        raise RequestError(400, f"more than {max_images} images in one request", "messages", "too_many_images")
    return url


def parse_messages(raw, max_images: int) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, "'messages' must be a non-empty list", "messages", "invalid_value")
    count, out = [0], []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(400, f"{where}: role must be system, developer, user or assistant", where, "invalid_value")
        content = m.get("content")
        if content is None and m["role"] == "assistant":
            content = ""
        if isinstance(content, str):
            parts = [{"type": "text", "text": limits.text(content, where)}]
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": limits.text(part["text"], at)})
                elif kind == "image_url":
                    parts.append({"type": "image", "image": image_source(part, at, max_images, count)})
                else:
                    raise RequestError(400, f"{at}: a part must be of type text or image_url", at, "invalid_value")
        else:
            raise RequestError(400, f"{where}: content must be a string or a list of parts", where, "invalid_value")
        out.append({"role": ROLES[m["role"]], "content": parts})
    if out[-1]["role"] != "user":
        raise RequestError(400, "the last message must be from the user", "messages", "invalid_value")
    limits.check_messages(out)
    return out


def schema_for(response_format):
    """json_object → "json"; json_schema → that schema; compiled later (limits.grammar), off the event loop."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise RequestError(400, "response_format.json_schema.schema must be an object", "response_format", "invalid_value")
        return schema
    raise RequestError(400, "response_format.type must be text, json_object or json_schema", "response_format",
                       "invalid_value")


def parse_request(body, max_images: int) -> tuple[list[dict], dict, bool, bool]:
    """(messages, sampling options, stream, include usage in the stream). A JSON schema is left in
    sampling["schema"] for the caller to compile (limits.grammar) off the event loop."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object", None, "invalid_json")
    messages = parse_messages(body.get("messages"), max_images)
    max_tokens = _number(body, "max_completion_tokens", 1, 1 << 20, True) or _number(body, "max_tokens", 1, 1 << 20, True)
    sampling = {"max_tokens": max_tokens, "temperature": _number(body, "temperature", 0, 2),
                "top_p": _number(body, "top_p", 0, 1), "seed": _number(body, "seed", 0, (1 << 32) - 1, True),
                "stop": limits.stops(body.get("stop"), "stop"), "schema": schema_for(body.get("response_format"))}
    if sampling["top_p"] == 0:
        sampling["top_p"] = 1e-6
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise RequestError(400, "'stream' must be true or false", "stream", "invalid_value")
    return messages, {k: v for k, v in sampling.items() if v is not None}, stream, bool(options.get("include_usage"))


def usage(stats: TurnStats) -> dict:
    return {"prompt_tokens": stats.prompt_positions, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_positions + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.reused_positions},
            "acestep": {"images_encoded": stats.images_encoded, "evaluated_tokens": stats.evaluated_positions,
                        "time_to_first_token_s": round(stats.time_to_first_token_s, 4),
                        "decode_tokens_per_s": round(stats.decode_tokens_per_s, 2)}}


class Ids:
    def __init__(self, model: str):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), model

    def completion(self, text: str, stats: TurnStats) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": FINISH.get(stats.finish_reason, "stop")}],
                "usage": usage(stats)}

    def chunk(self, delta: dict, finish: str | None = None) -> str:
        return json.dumps({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    def usage_chunk(self, stats: TurnStats) -> str:
        return json.dumps({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                           "choices": [], "usage": usage(stats)})
