"""Checkpoint → GGUF, one phase per module; ``convert`` is the driver."""

from .pipeline import ConvertProgress, convert

__all__ = ["convert", "ConvertProgress"]
