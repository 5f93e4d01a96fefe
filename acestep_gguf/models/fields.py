"""Typed, bounded reads of JSON fields (config.json, preprocessor_config.json, tokenizer files).

Every value a checkpoint gives us is checked where it is read: of the right JSON type, and inside
bounds that no real model comes within orders of magnitude of, so a typo or a hostile file fails
here with the field's name instead of as a traceback, a MemoryError or a hang later."""

from __future__ import annotations

import math

from ..errors import ConfigError

_MISSING = object()

# Generous bounds: the largest released models are far inside them.
MAX_WIDTH = 1 << 17  # hidden / intermediate sizes
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_VOCAB = 1 << 22
MAX_POSITIONS = 1 << 24
MAX_PARALLEL = 64  # sequences in one context (llama.cpp allows 256; each needs a KV cache of its own)
MAX_IMAGE = 4096  # pixels on a side of the model's input


class Fields:
    """One JSON object and the name it is reported under (e.g. ``config.json: text_config``)."""

    def __init__(self, data, where: str):
        if not isinstance(data, dict):
            raise ConfigError(f"{where} is {_kind(data)}, expected a JSON object")
        self.data, self.where = data, where

    def name(self, key: str) -> str:
        """How a field is named in messages: ``config.json: text_config.hidden_size``."""
        return f"{self.where}{': ' if self.where.endswith('.json') else '.'}{key}"

    def _get(self, key: str, default):
        value = self.data.get(key, default)
        if value is _MISSING or (value is None and default is _MISSING):
            raise ConfigError(f"{self.name(key)} is missing")
        return value

    def section(self, key: str, default=_MISSING) -> "Fields":
        value = self._get(key, default)
        return Fields({} if value is None else value, f"{self.name(key)}")

    def integer(self, key: str, lo: int, hi: int, default=_MISSING) -> int:
        value = self._get(key, default)
        if type(value) is float and value.is_integer():
            value = int(value)  # 4096.0 is written by some tools
        if type(value) is not int:
            raise ConfigError(f"{self.name(key)} is {_show(value)}, expected a whole number")
        if not lo <= value <= hi:
            raise ConfigError(f"{self.name(key)} is {value}, outside the range {lo}..{hi} a real model uses")
        return value

    def optional_integer(self, key: str, lo: int, hi: int) -> int | None:
        """None when the field is absent or null (as transformers treats an unset optional field)."""
        return None if self.data.get(key) is None else self.integer(key, lo, hi)

    def number(self, key: str, lo: float, hi: float, default=_MISSING) -> float:
        value = self._get(key, default)
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ConfigError(f"{self.name(key)} is {_show(value)}, expected a finite number")
        if not lo <= value <= hi:
            raise ConfigError(f"{self.name(key)} is {value}, outside the range {lo}..{hi} a real model uses")
        return float(value)

    def string(self, key: str, default=_MISSING) -> str | None:
        value = self._get(key, default)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{self.name(key)} is {_show(value)}, expected a string")
        return value

    def boolean(self, key: str, default=_MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.name(key)} is {_show(value)}, expected true or false")
        return value

    def numbers(self, key: str, length: int, default=_MISSING) -> list[float]:
        value = self._get(key, default)
        if not (isinstance(value, list) and len(value) == length
                and all(type(x) in (int, float) and math.isfinite(x) for x in value)):
            raise ConfigError(f"{self.name(key)} must be a list of {length} numbers, got {_show(value)}")
        return [float(x) for x in value]


def _kind(value) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _show(value) -> str:
    text = repr(value)
    return (text[:40] + "…") if len(text) > 40 else text
