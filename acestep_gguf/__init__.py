"""acestep-gguf: llava-style (Qwen2, Llama or Mistral + CLIP + MLP) checkpoints to quantized GGUF, and offline image chat.

llama.cpp and the runtime load on first use of ``VisionChat`` (and the converter on the first
``convert`` call), so importing the package and starting the CLI are quick, and a Ctrl-C during
start-up reaches the entry point's handler instead of printing a traceback from inside an import."""

__version__ = "0.1.0"

from .convert import convert  # noqa: E402  (light: the pipeline is imported on the first call)
from .errors import (AcestepGGUFError, BusyError, CancelledError, CheckpointError, ConfigError,  # noqa: E402
                     ContextFullError, ImageError, ModelFilesError, OptionError, OutputError, QuantizeError,
                     TensorError, UnsupportedArchitectureError)
from .manifest import Manifest  # noqa: E402

__all__ = ["convert", "VisionChat", "BatchRequest", "BatchReply", "Manifest", "AcestepGGUFError", "BusyError", "CancelledError", "CheckpointError",
           "ConfigError", "OptionError", "ContextFullError", "ImageError", "ModelFilesError", "OutputError",
           "QuantizeError", "TensorError", "UnsupportedArchitectureError"]


def __getattr__(name: str):
    if name in ("VisionChat", "BatchRequest", "BatchReply"):
        from . import runtime
        globals()[name] = getattr(runtime, name)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
