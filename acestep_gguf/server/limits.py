"""What one request may cost, checked before any work: text, messages, stop strings, JSON schemas and
the grammars made from them. Every bound is far above what a real client sends and far below what
would let a few hundred bytes buy gigabytes or minutes (docs/security.md lists them with figures)."""

from __future__ import annotations

import json
import re

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

MAX_MESSAGES = 512
MAX_PARTS = 64  # per message
MAX_TEXT_CHARS = 1 << 22  # all the text of one request (4 Mi characters: far beyond any context)
MAX_STOPS = 16
MAX_STOP_CHARS = 256
# JSON schemas (response_format / Ollama's format): llama.cpp's converter writes a repetition count
# out as that many copies, and a quantifier inside a regex pattern multiplies with the ones around it.
MAX_SCHEMA_BYTES = 64 << 10
MAX_SCHEMA_NODES = 4096
MAX_SCHEMA_DEPTH = 32
MAX_REPEAT = 256  # minItems, maxLength, ... and the numbers of a pattern's {n,m}
MAX_PATTERN_CHARS = 512
MAX_PATTERN_COUNTS = 2  # {n,m} quantifiers per pattern
MAX_GRAMMAR_CHARS = 1 << 20
COUNT_KEYS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties", "minContains",
              "maxContains")
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


class RequestError(Exception):
    """A client error: HTTP status, message, the parameter at fault, OpenAI's error code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def text(value: str, where: str) -> str:
    """A string that can be tokenized: valid Unicode (a lone surrogate, which JavaScript clients send
    when they cut text mid-emoji, is refused here instead of failing deep inside)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(400, f"{where}: text is not valid Unicode (a lone surrogate at character {e.start}); "
                           "send UTF-8 text", where, "invalid_text") from None
    return value


def check_messages(messages: list[dict]) -> None:
    """Counts and total size of a parsed conversation (parts already typed)."""
    if len(messages) > MAX_MESSAGES:
        raise RequestError(400, f"more than {MAX_MESSAGES} messages in one request", "messages", "too_many_messages")
    total = 0
    for i, m in enumerate(messages):
        if len(m["content"]) > MAX_PARTS:
            raise RequestError(400, f"messages[{i}]: more than {MAX_PARTS} parts", "messages", "too_many_parts")
        for part in m["content"]:
            if part["type"] == "text":
                total += len(text(part["text"], f"messages[{i}]"))
    if total > MAX_TEXT_CHARS:
        raise RequestError(413, f"the messages hold {total} characters of text, over the {MAX_TEXT_CHARS} limit",
                           "messages", "text_too_large")


def stops(value, where: str) -> list[str] | None:
    """A stop string or a list of them: at most MAX_STOPS, each non-empty and at most MAX_STOP_CHARS."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, list) and len(value) <= MAX_STOPS
            and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in value)):
        raise RequestError(400, f"'{where}' must be a string or a list of up to {MAX_STOPS} non-empty strings of at "
                           f"most {MAX_STOP_CHARS} characters", where, "invalid_value")
    return [text(s, where) for s in value]


def schema_problem(schema) -> str | None:
    """Why a JSON schema would cost too much to turn into a grammar, or None."""
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_BYTES:
        return f"the schema is {size} bytes, over the {MAX_SCHEMA_BYTES} limit"
    nodes = 0
    stack = [(schema, 0)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            return f"the schema has more than {MAX_SCHEMA_NODES} values"
        if depth > MAX_SCHEMA_DEPTH:
            return f"the schema is nested more than {MAX_SCHEMA_DEPTH} deep"
        if isinstance(node, dict):
            for key in COUNT_KEYS:
                if key in node and not (type(node[key]) is int and 0 <= node[key] <= MAX_REPEAT):
                    return f"{key} {str(node[key])[:20]} is outside 0..{MAX_REPEAT}"
            pattern = node.get("pattern")
            if pattern is not None:
                why = _pattern_problem(pattern)
                if why:
                    return why
            stack += [(v, depth + 1) for v in node.values()]
        elif isinstance(node, list):
            stack += [(v, depth + 1) for v in node]
    return None


def _pattern_problem(pattern) -> str | None:
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_CHARS:
        return f"a pattern must be a string of at most {MAX_PATTERN_CHARS} characters"
    counts = _QUANTIFIER.findall(pattern)
    if len(counts) > MAX_PATTERN_COUNTS:
        return f"a pattern has more than {MAX_PATTERN_COUNTS} {{n,m}} quantifiers"
    if any(int(n or 0) > MAX_REPEAT for pair in counts for n in pair):
        return f"a pattern repeats more than {MAX_REPEAT} times"
    return None


def grammar(schema, where: str) -> str:
    """The GBNF grammar for a JSON schema ("json" alone: any JSON object), within the bounds above.
    Called off the event loop: with the bounds, at most a fraction of a second."""
    if schema == "json":
        return JSON_GBNF
    if not isinstance(schema, dict):
        raise RequestError(400, f"{where}: a JSON schema must be an object", where, "invalid_value")
    why = schema_problem(schema)
    if why:
        raise RequestError(400, f"{where}: the JSON schema would cost too much to enforce: {why}", where,
                           "schema_too_large")
    try:
        out = json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # the converter raises (or asserts) on what it cannot express
        message = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise RequestError(400, f"{where}: unsupported JSON schema ({message})", where, "invalid_value") from None
    if len(out) > MAX_GRAMMAR_CHARS:
        raise RequestError(400, f"{where}: the schema makes a grammar of {len(out)} characters, over the "
                           f"{MAX_GRAMMAR_CHARS} limit", where, "schema_too_large")
    return out
