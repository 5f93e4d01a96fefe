"""The vocabulary a family module speaks: expected tensors and metadata entries as plain records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf import GGUFValueType


@dataclass(frozen=True)
class TensorSpec:
    """One tensor the output must contain: where it comes from, what llama.cpp calls it, its shape."""

    source_name: str  # canonical source name (after the family's prefix rewrites)
    gguf_name: str
    shape: tuple[int, ...]  # PyTorch / safetensors order
    role: str  # "language" or "vision"
    rope_heads: int = 0  # >0: rows reordered per head from Hugging Face's rotate_half to llama.cpp's pairs
    row: int | None = None  # one row of a source tensor another spec converts whole (Pixtral's [IMG_BREAK])


@dataclass(frozen=True)
class Ignored:
    """A source tensor that is deliberately not converted, and why."""

    source_name: str
    reason: str


@dataclass(frozen=True)
class MetadataEntry:
    key: str
    value: Any
    value_type: GGUFValueType
    sub_type: GGUFValueType | None = None


def expand(table, h, role: str, count: int | None = None) -> list[TensorSpec]:
    """Turn rows of (source pattern, gguf pattern, shape in hyper-parameter names — fields of ``h``,
    a TextHParams or a tower's VisionHParams) into TensorSpecs, once, or once per block id when
    ``count`` is given."""
    ids = [None] if count is None else range(count)
    specs = []
    for bid in ids:
        for source, gguf_name, shape in table:
            specs.append(
                TensorSpec(
                    source.format(bid=bid),
                    gguf_name.format(bid=bid),
                    tuple(getattr(h, d) if isinstance(d, str) else d for d in shape),
                    role,
                )
            )
    return specs
