"""The ACE-Step 1.5 model card as numbers, and llama.cpp's per-tensor type rules, so a user can plan
memory before downloading tens of gigabytes."""

from __future__ import annotations

# Qwen2.5-32B language model + CLIP ViT-H/14 at 448 px + 2-layer MLP projector.
PRESETS = {
    "ace-step-1.5": {
        "n_layer": 64, "n_embd": 5120, "n_ff": 27648, "n_head": 40, "n_head_kv": 8, "head_dim": 128,
        "n_vocab": 152064, "tied": False,
        "v_layer": 31,  # layers llama.cpp runs for vision_feature_layer -2 (of 32)
        "v_embd": 1280, "v_ff": 5120, "v_head": 16, "v_image": 448, "v_patch": 14,
    },
}

# ggml block sizes: bytes per block, elements per block.
TYPE_BLOCKS = {"F32": (4, 1), "F16": (2, 1), "BF16": (2, 1), "Q8_0": (34, 32), "Q4_K": (144, 256),
               "Q5_K": (176, 256), "Q6_K": (210, 256)}

# llama.cpp's llama-quant.cpp rules for the types we ship (dense, non-Falcon models): the base
# type, the type given to attn_v / ffn_down in the layers `use_more_bits` picks, and the output.
QUANT_RULES = {
    "Q4_K_M": {"base": "Q4_K", "more_bits": "Q6_K", "output": "Q6_K"},
    "Q5_K_M": {"base": "Q5_K", "more_bits": "Q6_K", "output": "Q6_K"},
    "Q8_0": {"base": "Q8_0", "more_bits": "Q8_0", "output": "Q8_0"},
    "F16": {"base": "F16", "more_bits": "F16", "output": "F16"},
    "BF16": {"base": "BF16", "more_bits": "BF16", "output": "BF16"},
}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits in *_K_M types."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def type_bytes(type_name: str, n_elements: int) -> int:
    size, block = TYPE_BLOCKS[type_name]
    return n_elements // block * size


def language_tensor_bytes(preset: dict, quant: str) -> tuple[list[int], dict[str, int]]:
    """(bytes of each repeating layer, bytes of token_embd / output / output_norm) for a preset."""
    p, rule = preset, QUANT_RULES[quant]
    e, f, q, kv = p["n_embd"], p["n_ff"], p["n_head"] * p["head_dim"], p["n_head_kv"] * p["head_dim"]
    layers = []
    for i in range(p["n_layer"]):
        special = rule["more_bits"] if use_more_bits(i, p["n_layer"]) else rule["base"]
        b = type_bytes(rule["base"], e * q + e * kv + q * e + 2 * e * f)  # q, k, o, gate, up
        b += type_bytes(special, e * kv) + type_bytes(special, f * e)  # v, down
        b += 4 * (2 * e + q + 2 * kv)  # norms and q/k/v biases stay F32
        layers.append(b)
    other = {"token_embd.weight": type_bytes(rule["base"], p["n_vocab"] * e), "output_norm.weight": 4 * e}
    if not p["tied"]:
        other["output.weight"] = type_bytes(rule["output"], p["n_vocab"] * e)
    return layers, other


def mmproj_bytes(preset: dict, quant: str) -> int:
    """Vision tower + projector: matrices in F16 or Q8_0, patch/position embeddings F16, vectors F32."""
    p, t = preset, ("Q8_0" if quant == "Q8_0" else "F16")
    v, ff, e = p["v_embd"], p["v_ff"], p["n_embd"]
    n_pos = (p["v_image"] // p["v_patch"]) ** 2 + 1
    per_layer = type_bytes(t, 4 * v * v + 2 * v * ff) + 4 * (4 * v + ff + 5 * v)
    fixed = type_bytes("F16", v * 3 * p["v_patch"] ** 2 + n_pos * v) + 4 * 3 * v
    projector = type_bytes(t, v * e + e * e) + 4 * 2 * e
    return p["v_layer"] * per_layer + fixed + projector
