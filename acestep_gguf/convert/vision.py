"""The lossless mmproj GGUF: clip metadata and the vision tower + projector tensors."""

from __future__ import annotations

from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as T
from gguf.utility import size_label

from ..models.spec import MetadataEntry
from .gguf_stream import OutTensor, lossless_type
from .plan import Plan

# ggml's im2col (the patch-embedding convolution) takes F32 or F16 kernels, not BF16.
CONVOLUTION_KERNELS = ("v.patch_embd.weight",)


def _vision_type(gguf_name: str, source) -> Q:
    """BF16 never reaches the mmproj: tensors llama.cpp's quantizer leaves as they are (position
    embeddings) would stay BF16, which GPU backends support unevenly. F32 keeps them exact."""
    if gguf_name in CONVOLUTION_KERNELS or source.dtype == "BF16":
        return Q.F32
    return lossless_type(source)


def vision_file(plan: Plan, name: str) -> tuple[list[MetadataEntry], list[OutTensor]]:
    metadata = [MetadataEntry("general.type", "mmproj", T.STRING), MetadataEntry("general.name", f"mmproj-{name}", T.STRING),
                MetadataEntry("general.size_label", size_label(sum(p.source.n_elements for p in plan.vision), 0, 0, 0),
                              T.STRING)]
    metadata += plan.family.vision_metadata(plan.hparams.vision)
    tensors = [OutTensor(p.spec.gguf_name, p.source, _vision_type(p.spec.gguf_name, p.source)) for p in plan.vision]
    return metadata, tensors
