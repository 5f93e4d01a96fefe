"""Model cards as numbers, so a user can plan memory before downloading tens of gigabytes. Byte
counts follow llama.cpp's per-tensor type rules (quant_types.TYPES) for dense llava models."""

from __future__ import annotations

from gguf import GGMLQuantizationType as Q

from ..quant_types import TYPES, tensor_bytes

CLIP_L_336 = {"v_layer": 23, "v_embd": 1024, "v_ff": 4096, "v_head": 16, "v_image": 336, "v_patch": 14}  # -2 of 24

PRESETS = {
    # Qwen2.5-32B language model + CLIP ViT-H/14 at 448 px + 2-layer MLP projector.
    "ace-step-1.5": {
        "family": "llava_qwen2", "qkv_bias": True,
        "n_layer": 64, "n_embd": 5120, "n_ff": 27648, "n_head": 40, "n_head_kv": 8, "head_dim": 128,
        "n_vocab": 152064, "tied": False,
        "v_layer": 31,  # layers llama.cpp runs for vision_feature_layer -2 (of 32)
        "v_embd": 1280, "v_ff": 5120, "v_head": 16, "v_image": 448, "v_patch": 14,
    },
    # llava-hf/llava-1.5-7b-hf: Vicuna-7B (Llama 2) + CLIP ViT-L/14 at 336 px.
    "llava-1.5-7b": {
        "family": "llava_llama", "qkv_bias": False,
        "n_layer": 32, "n_embd": 4096, "n_ff": 11008, "n_head": 32, "n_head_kv": 32, "head_dim": 128,
        "n_vocab": 32064, "tied": False, **CLIP_L_336,
    },
    # llava-hf/llava-1.5-13b-hf: Vicuna-13B + CLIP ViT-L/14 at 336 px.
    "llava-1.5-13b": {
        "family": "llava_llama", "qkv_bias": False,
        "n_layer": 40, "n_embd": 5120, "n_ff": 13824, "n_head": 40, "n_head_kv": 40, "head_dim": 128,
        "n_vocab": 32064, "tied": False, **CLIP_L_336,
    },
}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits in *_K_M types."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def language_tensor_bytes(preset: dict, quant: str) -> tuple[list[int], dict[str, int]]:
    """(bytes of each repeating layer, bytes of token_embd / output / output_norm) for a preset."""
    p, t = preset, TYPES[quant]
    e, f, q, kv = p["n_embd"], p["n_ff"], p["n_head"] * p["head_dim"], p["n_head_kv"] * p["head_dim"]
    vectors = 2 * e + (q + 2 * kv if p["qkv_bias"] else 0)  # norms (and q/k/v biases) stay F32
    layers = []
    for i in range(p["n_layer"]):
        special = t.more_bits if use_more_bits(i, p["n_layer"]) else t.base
        b = tensor_bytes(t.base, e * q + e * kv + q * e + 2 * e * f)  # q, k, o, gate, up
        b += tensor_bytes(special, e * kv) + tensor_bytes(special, f * e)  # v, down
        layers.append(b + 4 * vectors)
    other = {"token_embd.weight": tensor_bytes(t.base, p["n_vocab"] * e), "output_norm.weight": 4 * e}
    if not p["tied"]:
        other["output.weight"] = tensor_bytes(t.output, p["n_vocab"] * e)
    return layers, other


def mmproj_bytes(preset: dict, quant: str) -> int:
    """Vision tower + projector: matrices in F16 or Q8_0, patch/position embeddings F16, vectors F32."""
    p, t = preset, TYPES[quant].base
    v, ff, e = p["v_embd"], p["v_ff"], p["n_embd"]
    n_pos = (p["v_image"] // p["v_patch"]) ** 2 + 1
    per_layer = tensor_bytes(t, 4 * v * v + 2 * v * ff) + 4 * (4 * v + ff + 5 * v)
    fixed = tensor_bytes(Q.F16, v * 3 * p["v_patch"] ** 2 + n_pos * v) + 4 * 3 * v
    projector = tensor_bytes(t, v * e + e * e) + 4 * 2 * e
    return p["v_layer"] * per_layer + fixed + projector
