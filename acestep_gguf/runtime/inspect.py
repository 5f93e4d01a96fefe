"""A readable summary of one GGUF file, for `acestep-gguf info`."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import ModelFilesError
from ..models.registry import for_gguf
from .gguf_header import LongArray, read_header
from ..quant_types import name_of_file_type
from .model_files import check_file, fields_of


def describe(path: Path) -> dict:
    """The facts a person checks first: what the file is, its types and sizes, the tokenizer or vision setup."""
    path = Path(path)
    header = read_header(path)

    def field(key, default=None):
        value = header.fields.get(key, default)
        return value.count if isinstance(value, LongArray) else value

    arch = field("general.architecture")
    try:
        check_file(fields_of(header), path, "vision" if arch == "clip" else "language")
        check = "ok (llama.cpp can load it)"
    except ModelFilesError as e:
        check = f"failed: {str(e).removeprefix(str(path) + ': ')}"
    types: dict[str, int] = {}
    for t in header.tensors:
        types[t.type.name] = types.get(t.type.name, 0) + 1
    facts = {
        "file": str(path), "bytes": path.stat().st_size, "architecture": arch, "name": field("general.name"),
        "file_type": name_of_file_type(field("general.file_type")),
        "tensors": len(header.tensors), "tensor_types": types,
        "parameters": sum(math.prod(t.shape) for t in header.tensors), "check": check,
    }
    if arch == "clip":
        for key in ("clip.projector_type", "clip.vision.image_size", "clip.vision.patch_size",
                    "clip.vision.embedding_length", "clip.vision.block_count", "clip.vision.projection_dim",
                    "clip.vision.feature_layer", "clip.vision.image_mean", "clip.vision.image_std", "clip.use_gelu",
                    "clip.use_silu", "clip.vision.image_grid_pinpoints", "acestep_gguf.image.resize_shortest_edge",
                    "acestep_gguf.image.longest_edge"):
            value = field(key)
            if value is not None:
                facts[key.split(".", 1)[1]] = value
        if check.startswith("ok"):  # the tower, and what one picture costs in the language model's context
            family = for_gguf(header.fields, "vision")
            facts["vision_tower"] = family.vision.name
            facts["image_tokens_max"] = family.vision.max_image_tokens(family.vision.gguf_hparams(header.fields))
    else:
        for key in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                    "attention.head_count", "attention.head_count_kv", "rope.freq_base", "rope.scaling.type",
                    "rope.scaling.factor", "rope.scaling.original_context_length"):
            value = field(f"{arch}.{key}")
            if value is not None:
                facts[key] = value
        facts["tokenizer"] = f"{field('tokenizer.ggml.model')} / {field('tokenizer.ggml.pre')}, " \
                             f"{_count(header.fields.get('tokenizer.ggml.tokens'))} tokens, " \
                             f"{_count(header.fields.get('tokenizer.ggml.merges'))} merges"
        facts["eos_token_id"] = field("tokenizer.ggml.eos_token_id")
        template = field("tokenizer.chat_template")
        facts["chat_template"] = (template[:120] + "…") if template and len(template) > 120 else template
    return facts


def _count(value) -> int:
    return value.count if isinstance(value, LongArray) else len(value or [])
