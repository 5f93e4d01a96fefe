"""Which family module describes a checkpoint, decided from config.json alone."""

from __future__ import annotations

from types import ModuleType

from ..errors import UnsupportedArchitectureError
from . import llava_qwen2

FAMILIES: tuple[ModuleType, ...] = (llava_qwen2,)


def detect(config: dict, config_path: str = "config.json") -> ModuleType:
    """The family module whose ARCHITECTURES and sub-model types match ``config``."""
    architectures = config.get("architectures") or []
    for family in FAMILIES:
        if any(a in family.ARCHITECTURES for a in architectures):
            return family
    what = f"architectures {architectures}" if architectures else (
        f"_class_name {config['_class_name']!r}" if "_class_name" in config else "no 'architectures' field")
    supported = ", ".join(a for f in FAMILIES for a in f.ARCHITECTURES)
    raise UnsupportedArchitectureError(
        f"{config_path}: {what}: not a supported vision-language checkpoint; "
        f"acestep-gguf converts {supported} (Qwen2 + CLIP + MLP projector)"
    )


def for_gguf(fields: dict, role: str) -> ModuleType | None:
    """The family that reads this GGUF file: by architecture for a language model, by projector
    type for an mmproj (which does not say which language model it belongs to)."""
    if role == "vision":
        return next((f for f in FAMILIES if f.PROJECTOR_TYPE == fields.get("clip.projector_type")), None)
    return next((f for f in FAMILIES if f.GGUF_ARCH == fields.get("general.architecture")), None)
