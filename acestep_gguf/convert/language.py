"""The lossless language-model GGUF: the family's metadata, tokenizer, chat template and tensors."""

from __future__ import annotations

from gguf import GGUFValueType as T
from gguf.utility import size_label

from ..models.spec import MetadataEntry
from .checkpoint import Checkpoint
from .gguf_stream import OutTensor, lossless_type
from .plan import Plan
from .template import choose
from .tokenizer import tokenizer_metadata


def language_file(plan: Plan, ckpt: Checkpoint, name: str) -> tuple[list[MetadataEntry], list[OutTensor], str]:
    """(metadata, tensors, where the chat template came from)."""
    h = plan.hparams
    template, template_source = choose(ckpt.chat_template, plan.family.language.builtin_template)
    metadata = [MetadataEntry("general.type", "model", T.STRING), MetadataEntry("general.name", name, T.STRING),
                MetadataEntry("general.size_label", size_label(sum(p.source.n_elements for p in plan.language), 0, 0, 0),
                              T.STRING)]
    metadata += plan.family.language_metadata(h)
    metadata += tokenizer_metadata(plan.family.language.tokenizer, ckpt.tokenizer, ckpt.tokenizer_config, ckpt.config,
                                   h["n_vocab"])
    metadata.append(MetadataEntry("tokenizer.chat_template", template, T.STRING))
    tensors = [OutTensor(p.spec.gguf_name, p.source, lossless_type(p.source), p.spec.rope_heads) for p in plan.language]
    return metadata, tensors, template_source
