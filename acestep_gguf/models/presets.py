"""Model cards as numbers, so a user can plan memory before downloading tens of gigabytes. Byte
counts follow llama.cpp's per-tensor type rules (convert/tensor_types.py) for dense llava models."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gguf import GGMLQuantizationType as Q

from ..quant_types import TYPES, tensor_bytes
from .clip import ClipHParams
from .hparams import TextHParams, VisionHParams
from .llava_next import AnyresHParams
from .pixtral import PixtralHParams
from .registry import by_name

@dataclass(frozen=True)
class ModelCard:
    """A published model's dimensions, as the same typed values a checkpoint's config gives."""

    family: str  # a Family name (models/registry.py)
    text: TextHParams
    vision: VisionHParams


def _card(family: str, text: TextHParams, vision: type, **fields) -> ModelCard:
    """The vision half gets the language model's width and its tower's own positions per tile."""
    n_pos = by_name(family).vision.n_tile_positions(fields["v_image"], fields["v_patch"])
    return ModelCard(family, text, vision(n_embd=text.n_embd, v_n_pos=n_pos, **fields))


CLIP_L_336 = dict(v_feature_layer=23, v_n_layer=24, v_embd=1024, v_ff=4096, v_head=16, v_image=336, v_patch=14)  # -2 of 24
# llava-hf/llava-v1.6-*-hf: the same tower, tiled by these pinpoints ((height, width))
ANYRES_336 = dict(CLIP_L_336, pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)))


def _presets() -> dict[str, ModelCard]:
    vicuna_7b = TextHParams(n_vocab=32064, n_embd=4096, n_ff=11008, n_layer=32, n_head=32, n_head_kv=32, head_dim=128)
    vicuna_13b = TextHParams(n_vocab=32064, n_embd=5120, n_ff=13824, n_layer=40, n_head=40, n_head_kv=40, head_dim=128)
    return {
        # Qwen2.5-32B language model + CLIP ViT-H/14 at 448 px + 2-layer MLP projector; llama.cpp runs
        # 31 of the tower's 32 layers (vision_feature_layer -2)
        "ace-step-1.5": _card("llava_qwen2", TextHParams(n_vocab=152064, n_embd=5120, n_ff=27648, n_layer=64, n_head=40,
                                                         n_head_kv=8, head_dim=128), ClipHParams,
                              v_feature_layer=31, v_n_layer=32, v_embd=1280, v_ff=5120, v_head=16, v_image=448, v_patch=14),
        # llava-hf/llava-1.5-7b-hf and -13b-hf: Vicuna (Llama 2) + CLIP ViT-L/14 at 336 px.
        "llava-1.5-7b": _card("llava_llama", vicuna_7b, ClipHParams, **CLIP_L_336),
        "llava-1.5-13b": _card("llava_llama", vicuna_13b, ClipHParams, **CLIP_L_336),
        # llava-hf/llava-v1.6-mistral-7b-hf: Mistral-7B-Instruct-v0.2 + CLIP ViT-L/14-336, any resolution.
        "llava-v1.6-mistral-7b": _card("llava_next_llama", TextHParams(n_vocab=32064, n_embd=4096, n_ff=14336, n_layer=32,
                                                                       n_head=32, n_head_kv=8, head_dim=128),
                                       AnyresHParams, **ANYRES_336),
        # llava-hf/llava-v1.6-vicuna-7b-hf and -13b-hf: Vicuna v1.5.
        "llava-v1.6-vicuna-7b": _card("llava_next_llama", vicuna_7b, AnyresHParams, **ANYRES_336),
        "llava-v1.6-vicuna-13b": _card("llava_next_llama", vicuna_13b, AnyresHParams, **ANYRES_336),
        # llava-hf/llava-v1.6-34b-hf: Nous-Hermes-2-Yi-34B (a Llama in llama.cpp).
        "llava-v1.6-34b": _card("llava_next_llama", TextHParams(n_vocab=64064, n_embd=7168, n_ff=20480, n_layer=60,
                                                                n_head=56, n_head_kv=8, head_dim=128),
                                AnyresHParams, **ANYRES_336),
        # mistral-community/pixtral-12b: Mistral-NeMo-12B (vocab 131072) + Pixtral ViT (24 layers, 16 px, 1024 px).
        "pixtral-12b": _card("llava_pixtral", TextHParams(n_vocab=131072, n_embd=5120, n_ff=14336, n_layer=40, n_head=32,
                                                          n_head_kv=8, head_dim=128), PixtralHParams,
                             v_feature_layer=24, v_n_layer=24, v_embd=1024, v_ff=4096, v_head=16, v_image=1024, v_patch=16,
                             longest_edge=1024),
    }


PRESETS: dict[str, ModelCard] = _presets()


def language_tensor_bytes(card: ModelCard, quant: str) -> tuple[list[int], dict[str, int]]:
    """(bytes of each repeating layer, bytes of token_embd / output / output_norm) for a model card: the
    tensors its family's tables list for these dimensions, each in the type llama.cpp's rules give it
    (convert/tensor_types.py)."""
    from ..convert.tensor_types import TensorInfo, choose_types, quantizer_order
    family, t = by_name(card.family), card.text
    specs = {s.gguf_name: s for s in family.role_tensors(t, "language")}
    infos = [TensorInfo(n, tuple(reversed(specs[n].shape)), Q.BF16 if len(specs[n].shape) == 2 else Q.F32)
             for n in quantizer_order(list(specs))]
    # the types that need an importance matrix are sized as made with one (their rules change with it)
    types = choose_types(infos, TYPES[quant], t.n_layer, family.language.is_70b(t), t.n_head // t.n_head_kv,
                         has_imatrix=TYPES[quant].needs_imatrix)
    layers, other = [0] * t.n_layer, {}
    for info, qtype in zip(infos, types):
        n_bytes = tensor_bytes(qtype, math.prod(info.ne))
        if info.name.startswith("blk."):
            layers[int(info.name.split(".")[1])] += n_bytes
        else:
            other[info.name] = n_bytes
    return layers, other


def mmproj_bytes(card: ModelCard, quant: str) -> int:
    """Vision tower + projector of a model card, as its tower sizes them."""
    return by_name(card.family).vision.mmproj_bytes(card.vision, TYPES[quant].base)
