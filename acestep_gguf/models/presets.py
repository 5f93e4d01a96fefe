"""Model cards as numbers, so a user can plan memory before downloading tens of gigabytes. Byte
counts follow llama.cpp's per-tensor type rules (convert/tensor_types.py) for dense llava models."""

from __future__ import annotations

import math

from gguf import GGMLQuantizationType as Q

from ..quant_types import TYPES, tensor_bytes

CLIP_L_336 = {"v_layer": 23, "v_embd": 1024, "v_ff": 4096, "v_head": 16, "v_image": 336, "v_patch": 14}  # -2 of 24
# llava-hf/llava-v1.6-*-hf: the same tower, tiled by these pinpoints ([height, width])
ANYRES_336 = {**CLIP_L_336, "pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]}

PRESETS = {
    # Qwen2.5-32B language model + CLIP ViT-H/14 at 448 px + 2-layer MLP projector.
    "ace-step-1.5": {
        "family": "llava_qwen2",
        "n_layer": 64, "n_embd": 5120, "n_ff": 27648, "n_head": 40, "n_head_kv": 8, "head_dim": 128,
        "n_vocab": 152064, "tied": False,
        "v_layer": 31,  # layers llama.cpp runs for vision_feature_layer -2 (of 32)
        "v_embd": 1280, "v_ff": 5120, "v_head": 16, "v_image": 448, "v_patch": 14,
    },
    # llava-hf/llava-1.5-7b-hf: Vicuna-7B (Llama 2) + CLIP ViT-L/14 at 336 px.
    "llava-1.5-7b": {
        "family": "llava_llama",
        "n_layer": 32, "n_embd": 4096, "n_ff": 11008, "n_head": 32, "n_head_kv": 32, "head_dim": 128,
        "n_vocab": 32064, "tied": False, **CLIP_L_336,
    },
    # llava-hf/llava-1.5-13b-hf: Vicuna-13B + CLIP ViT-L/14 at 336 px.
    "llava-1.5-13b": {
        "family": "llava_llama",
        "n_layer": 40, "n_embd": 5120, "n_ff": 13824, "n_head": 40, "n_head_kv": 40, "head_dim": 128,
        "n_vocab": 32064, "tied": False, **CLIP_L_336,
    },
    # llava-hf/llava-v1.6-mistral-7b-hf: Mistral-7B-Instruct-v0.2 + CLIP ViT-L/14-336, any resolution.
    "llava-v1.6-mistral-7b": {
        "family": "llava_next_llama",
        "n_layer": 32, "n_embd": 4096, "n_ff": 14336, "n_head": 32, "n_head_kv": 8, "head_dim": 128,
        "n_vocab": 32064, "tied": False, **ANYRES_336,
    },
    # llava-hf/llava-v1.6-vicuna-7b-hf: Vicuna-7B v1.5.
    "llava-v1.6-vicuna-7b": {
        "family": "llava_next_llama",
        "n_layer": 32, "n_embd": 4096, "n_ff": 11008, "n_head": 32, "n_head_kv": 32, "head_dim": 128,
        "n_vocab": 32064, "tied": False, **ANYRES_336,
    },
    # llava-hf/llava-v1.6-vicuna-13b-hf: Vicuna-13B v1.5.
    "llava-v1.6-vicuna-13b": {
        "family": "llava_next_llama",
        "n_layer": 40, "n_embd": 5120, "n_ff": 13824, "n_head": 40, "n_head_kv": 40, "head_dim": 128,
        "n_vocab": 32064, "tied": False, **ANYRES_336,
    },
    # llava-hf/llava-v1.6-34b-hf: Nous-Hermes-2-Yi-34B (a Llama in llama.cpp).
    "llava-v1.6-34b": {
        "family": "llava_next_llama",
        "n_layer": 60, "n_embd": 7168, "n_ff": 20480, "n_head": 56, "n_head_kv": 8, "head_dim": 128,
        "n_vocab": 64064, "tied": False, **ANYRES_336,
    },
    # mistral-community/pixtral-12b: Mistral-NeMo-12B (vocab 131072) + Pixtral ViT (24 layers, 16 px patches, 1024 px).
    "pixtral-12b": {
        "family": "llava_pixtral",
        "n_layer": 40, "n_embd": 5120, "n_ff": 14336, "n_head": 32, "n_head_kv": 8, "head_dim": 128,
        "n_vocab": 131072, "tied": False,
        "v_layer": 24, "v_embd": 1024, "v_ff": 4096, "v_head": 16, "v_image": 1024, "v_patch": 16,
    },
}


def language_tensor_bytes(preset: dict, quant: str) -> tuple[list[int], dict[str, int]]:
    """(bytes of each repeating layer, bytes of token_embd / output / output_norm) for a preset: the
    tensors its family's tables list for these dimensions, each in the type llama.cpp's rules give it
    (convert/tensor_types.py)."""
    from ..convert.tensor_types import TensorInfo, choose_types, quantizer_order
    from .registry import FAMILIES
    p = preset
    family = next(f for f in FAMILIES if f.name == p["family"])
    h = {"n_embd": p["n_embd"], "n_ff": p["n_ff"], "n_layer": p["n_layer"], "n_head": p["n_head"],
         "n_head_kv": p["n_head_kv"], "head_dim": p["head_dim"], "n_vocab": p["n_vocab"], "tie_word_embeddings": p["tied"],
         "n_q": p["n_head"] * p["head_dim"], "n_kv": p["n_head_kv"] * p["head_dim"]}
    specs = {s.gguf_name: s for s in family.role_tensors(h, "language")}
    infos = [TensorInfo(n, tuple(reversed(specs[n].shape)), Q.BF16 if len(specs[n].shape) == 2 else Q.F32)
             for n in quantizer_order(list(specs))]
    # the types that need an importance matrix are sized as made with one (their rules change with it)
    types = choose_types(infos, TYPES[quant], p["n_layer"], family.language.is_70b(h), p["n_head"] // p["n_head_kv"],
                         has_imatrix=TYPES[quant].needs_imatrix)
    layers, other = [0] * p["n_layer"], {}
    for t, qtype in zip(infos, types):
        n_bytes = tensor_bytes(qtype, math.prod(t.ne))
        if t.name.startswith("blk."):
            layers[int(t.name.split(".")[1])] += n_bytes
        else:
            other[t.name] = n_bytes
    return layers, other


def mmproj_bytes(preset: dict, quant: str) -> int:
    """Vision tower + projector of a preset, as its tower sizes them."""
    from .registry import by_name
    return by_name(preset["family"]).vision.mmproj_bytes(preset, TYPES[quant].base)
