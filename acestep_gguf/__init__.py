"""acestep-gguf: llava-style (Qwen2 + CLIP + MLP) checkpoints to quantized GGUF, and offline image chat."""

__version__ = "0.1.0"

from .errors import (AcestepGGUFError, BusyError, CancelledError, CheckpointError, ConfigError, ContextFullError,  # noqa: E402
                     ImageError, ModelFilesError, OptionError, OutputError, QuantizeError, TensorError,
                     UnsupportedArchitectureError)
from .manifest import Manifest  # noqa: E402
from .convert import convert  # noqa: E402
from .runtime import VisionChat  # noqa: E402

__all__ = ["convert", "VisionChat", "Manifest", "AcestepGGUFError", "BusyError", "CancelledError", "CheckpointError",
           "ConfigError", "OptionError",
           "ContextFullError", "ImageError", "ModelFilesError", "OutputError", "QuantizeError", "TensorError",
           "UnsupportedArchitectureError"]
