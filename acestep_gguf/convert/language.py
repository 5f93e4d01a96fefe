"""The lossless language-model GGUF: the family's metadata, tokenizer, chat template and tensors."""

from __future__ import annotations

from gguf import GGUFValueType as T
from gguf.utility import size_label

from ..models.spec import MetadataEntry
from .checkpoint import Checkpoint
from .gguf_stream import OutTensor, lossless_type
from .plan import Plan
from ..templates import PLACEHOLDER_KEY
from ..models.family import context_length
from .template import choose
from .tokenizer import image_placeholder, tokenizer_metadata


def language_file(plan: Plan, ckpt: Checkpoint, name: str) -> tuple[list[MetadataEntry], list[OutTensor], list[str]]:
    """(metadata, tensors, notes for the user: what differs from the checkpoint's own behaviour)."""
    h = plan.hparams.text
    template = choose(ckpt.chat_template, plan.family.language.builtin_template,
                      image_placeholder(ckpt.tokenizer, ckpt.config))
    metadata = [MetadataEntry("general.type", "model", T.STRING), MetadataEntry("general.name", name, T.STRING),
                MetadataEntry("general.size_label", size_label(sum(p.source.n_elements for p in plan.language), 0, 0, 0),
                              T.STRING)]
    metadata += plan.family.language_metadata(h)
    metadata += tokenizer_metadata(plan.family.language.tokenizer, ckpt.tokenizer, ckpt.tokenizer_config, ckpt.config,
                                   h.n_vocab)
    metadata.append(MetadataEntry("tokenizer.chat_template", template.template, T.STRING))
    metadata.append(MetadataEntry(PLACEHOLDER_KEY, template.placeholder, T.STRING))
    tensors = [OutTensor(p.spec.gguf_name, p.source, lossless_type(p.source), p.spec.rope_heads) for p in plan.language]
    notes = [template.note] if template.note else []
    if h.sliding_window is not None and h.sliding_window < context_length(h):
        notes.append(f"transformers attends within a {h.sliding_window}-token sliding window, llama.cpp's "
                     f"{plan.family.gguf_arch} architecture over the whole context: answers match up to "
                     f"{h.sliding_window} positions")
    return metadata, tensors, notes
