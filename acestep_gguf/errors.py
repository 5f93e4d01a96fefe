"""Typed errors. Each message is one line that names the file, tensor or field at fault and,
where there is one, the fix; the CLI prints it as is and exits non-zero."""


class AcestepGGUFError(Exception):
    """Base class: anything the user can cause and fix."""


class CheckpointError(AcestepGGUFError):
    """The source checkpoint is unreadable, inconsistent or unsafe."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint is not a llava-style Qwen2 + CLIP + MLP model."""


class ConfigError(CheckpointError):
    """A field of config.json (or a sibling JSON file) is missing or has a value we cannot convert."""


class TensorError(CheckpointError):
    """A source tensor is missing, unexpected, mis-shaped, of an unsupported dtype, or not finite."""


class OutputError(AcestepGGUFError):
    """Writing the outputs failed: disk space, permissions, verification of a written file."""


class QuantizeError(AcestepGGUFError):
    """llama.cpp's quantizer refused or failed."""


class ModelFilesError(AcestepGGUFError):
    """The runtime cannot use the given model / mmproj / manifest."""


class ImageError(AcestepGGUFError):
    """An image was refused: unreadable, wrong format, too large, too small, or remote."""


class ContextFullError(AcestepGGUFError):
    """The conversation no longer fits in the context window."""


class OptionError(AcestepGGUFError):
    """An option or argument has a value we cannot use (out of range, wrong unit, unknown name)."""


class CancelledError(AcestepGGUFError):
    """cancel() or close() ended a call that returns a value (a streamed turn just ends instead)."""


class BusyError(AcestepGGUFError):
    """A second generation was started on a VisionChat that is still generating."""
