"""Model cards as numbers, so a user can plan memory before downloading tens of gigabytes. Byte
counts follow llama.cpp's per-tensor type rules (convert/tensor_types.py) for dense llava models."""

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


def language_tensor_bytes(preset: dict, quant: str) -> tuple[list[int], dict[str, int]]:
    """(bytes of each repeating layer, bytes of token_embd / output / output_norm) for a preset: its
    tensors as the converter lists them, each in the type llama.cpp's rules give it (tensor_types.py)."""
    from ..convert.tensor_types import TensorInfo, choose_types, quantizer_order
    p = preset
    e, f, q, kv, v = p["n_embd"], p["n_ff"], p["n_head"] * p["head_dim"], p["n_head_kv"] * p["head_dim"], p["n_vocab"]
    ne = {"token_embd.weight": (e, v), "output_norm.weight": (e,)}  # ggml order: row length first
    if not p["tied"]:
        ne["output.weight"] = (e, v)
    for i in range(p["n_layer"]):
        b = f"blk.{i}."
        ne.update({b + "attn_norm.weight": (e,), b + "attn_q.weight": (e, q), b + "attn_k.weight": (e, kv),
                   b + "attn_v.weight": (e, kv), b + "attn_output.weight": (q, e), b + "ffn_norm.weight": (e,),
                   b + "ffn_gate.weight": (e, f), b + "ffn_up.weight": (e, f), b + "ffn_down.weight": (f, e)})
        if p["qkv_bias"]:
            ne.update({b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)})
    infos = [TensorInfo(n, ne[n], Q.BF16 if len(ne[n]) == 2 else Q.F32) for n in quantizer_order(list(ne))]
    # the types that need an importance matrix are sized as made with one (their rules change with it)
    types = choose_types(infos, TYPES[quant], p["n_layer"], p.get("is_70b", False), p["n_head"] // p["n_head_kv"],
                         has_imatrix=TYPES[quant].needs_imatrix)
    layers, other = [0] * p["n_layer"], {}
    for t, qtype in zip(infos, types):
        n_bytes = tensor_bytes(qtype, _elements(t.ne))
        if t.name.startswith("blk."):
            layers[int(t.name.split(".")[1])] += n_bytes
        else:
            other[t.name] = n_bytes
    return layers, other


def _elements(ne) -> int:
    n = 1
    for d in ne:
        n *= d
    return n


def mmproj_bytes(preset: dict, quant: str) -> int:
    """Vision tower + projector: matrices in F16 or Q8_0, patch/position embeddings F16, vectors F32."""
    p, t = preset, TYPES[quant].base
    v, ff, e = p["v_embd"], p["v_ff"], p["n_embd"]
    n_pos = (p["v_image"] // p["v_patch"]) ** 2 + 1
    per_layer = tensor_bytes(t, 4 * v * v + 2 * v * ff) + 4 * (4 * v + ff + 5 * v)
    fixed = tensor_bytes(Q.F16, v * 3 * p["v_patch"] ** 2 + n_pos * v) + 4 * 3 * v
    projector = tensor_bytes(t, v * e + e * e) + 4 * 2 * e
    return p["v_layer"] * per_layer + fixed + projector
