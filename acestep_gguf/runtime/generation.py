"""Generation's plain data: sampling options, what a turn cost, and the stop-string release rule."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

from ..errors import OptionError


@dataclass
class TurnStats:
    """What the last turn cost; tests and benchmarks read this instead of timing."""

    prompt_positions: int = 0  # positions the conversation occupies once the prompt is in the cache
    reused_positions: int = 0  # of those, already in the cache from earlier turns
    evaluated_positions: int = 0  # newly evaluated this turn (text tokens + image positions)
    images_encoded: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""  # stop, length, context, cancelled
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.completion_tokens - 1) / self.decode_s if self.completion_tokens > 1 and self.decode_s else 0.0


@dataclass
class SamplingOptions:
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 0.95
    seed: int | None = None
    stop: Sequence[str] = ()

    @classmethod
    def from_kwargs(cls, default_seed: int | None, **kwargs) -> "SamplingOptions":
        """Checked options: unknown names and out-of-range values are one-line errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise OptionError(f"unknown sampling option {unknown[0]!r} (known: {', '.join(sorted(known))})")
        o = cls(**{k: v for k, v in kwargs.items() if v is not None})
        if o.seed is None:
            o.seed = default_seed
        if type(o.max_tokens) is not int or o.max_tokens < 1:
            raise OptionError(f"max_tokens {o.max_tokens!r}: a whole number of at least 1")
        if not isinstance(o.temperature, (int, float)) or not 0 <= o.temperature <= 100:
            raise OptionError(f"temperature {o.temperature!r}: a number from 0 (greedy) to 100")
        if not isinstance(o.top_p, (int, float)) or not 0 < o.top_p <= 1:
            raise OptionError(f"top_p {o.top_p!r}: a number in (0, 1]")
        if o.seed is not None and (type(o.seed) is not int or not 0 <= o.seed < 1 << 32):
            raise OptionError(f"seed {o.seed!r}: a whole number from 0 to 2**32-1")
        if isinstance(o.stop, str):
            o.stop = [o.stop]
        if not all(isinstance(s, str) and s for s in o.stop):
            raise OptionError("stop: a list of non-empty strings")
        return o


def release(text: str, sent: int, stops: Sequence[str]) -> tuple[str, bool]:
    """The text safe to yield now: up to a stop string if one appeared, else all but a possible stop prefix."""
    for stop in stops:
        at = text.find(stop, max(0, sent - len(stop)))
        if at >= 0:
            return text[sent:at], True
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return text[sent:len(text) - hold], False
