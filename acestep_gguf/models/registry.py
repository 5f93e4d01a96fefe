"""Which Family describes a checkpoint or a GGUF file. Registering a family is one line here (or a
call to ``register`` from anywhere, e.g. a test); nothing else in the package names families."""

from __future__ import annotations

from ..errors import UnsupportedArchitectureError
from . import llava_llama, llava_next, llava_qwen2, pixtral
from .family import Family
from .fields import Fields

FAMILIES: list[Family] = [llava_qwen2.FAMILY, llava_llama.FAMILY, llava_next.FAMILY_LLAMA, llava_next.FAMILY_QWEN2,
                           pixtral.FAMILY]

# The card's peers that are not (yet) converted, and why: said in one line instead of "not supported".
OUT_OF_REACH = {
    "Idefics2ForConditionalGeneration": "IDEFICS-2 is not llava-style: a SigLIP tower feeds a perceiver resampler "
                                        "(64 learned queries per picture) that llama.cpp has no graph for, so no "
                                        "mmproj of it can run",
}
OUT_OF_REACH_VISION: dict[str, str] = {}


def register(family: Family) -> None:
    """Make a family known to the converter, runtime and planner."""
    if family not in FAMILIES:
        FAMILIES.append(family)


def detect(config: dict, config_path: str = "config.json") -> Family:
    """The family whose architectures and sub-model types match ``config``."""
    for family in FAMILIES:
        if family.matches(config):
            return family
    architectures = config.get("architectures") or []
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else {}
    reason = next((OUT_OF_REACH[a] for a in architectures if isinstance(a, str) and a in OUT_OF_REACH),
                  OUT_OF_REACH_VISION.get(vision.get("model_type")))
    if reason:
        raise UnsupportedArchitectureError(f"{config_path}: {architectures[0]} cannot be converted: {reason}")
    if any(a in f.architectures for f in FAMILIES for a in architectures):
        top = Fields(config, "config.json")  # a text_config that is no object is named as such
        model_type = top.section("text_config").data.get("model_type")
        vision_type = top.section("vision_config").data.get("model_type")
        raise UnsupportedArchitectureError(
            f"{config_path}: text_config.model_type {model_type!r} with vision_config.model_type {vision_type!r} is "
            f"not supported; supported language models: {', '.join(t for f in FAMILIES for t in f.language.model_types)}"
            f" with {', '.join(sorted({t for f in FAMILIES for t in f.vision_model_types}))}")
    what = f"architectures {architectures}" if architectures else (
        f"_class_name {config['_class_name']!r}" if "_class_name" in config else "no 'architectures' field")
    supported = "; ".join(f"{f.description}" for f in FAMILIES)
    raise UnsupportedArchitectureError(
        f"{config_path}: {what}: not a supported vision-language checkpoint; acestep-gguf converts "
        f"LlavaForConditionalGeneration and LlavaNextForConditionalGeneration checkpoints: {supported}")


def for_gguf(fields: dict, role: str) -> Family | None:
    """The family that reads this GGUF file: by architecture for a language model, by its vision
    tower for an mmproj (which does not say which language model it belongs to)."""
    if role == "vision":
        return next((f for f in FAMILIES if f.vision.reads(fields)), None)
    same_arch = [f for f in FAMILIES if f.gguf_arch == fields.get("general.architecture")]
    # llama.cpp's `llama` is written with a SentencePiece (LLaVA) or a byte-level BPE (Pixtral) vocabulary
    return next((f for f in same_arch if f.language.tokenizer == fields.get("tokenizer.ggml.model")),
                same_arch[0] if same_arch else None)


def by_name(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)
