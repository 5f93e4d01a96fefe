"""Which ggml type each tensor gets in a quantized file: llama.cpp 0.3.36's own choice, mirrored.

`llama_model_quantize` (vendor/llama.cpp/src/llama-quant.cpp) decides per tensor in
`llama_model_quantize_impl`'s preliminary loop: `tensor_allows_quantization`, then
`llama_tensor_get_type` → `llama_tensor_get_type_impl` (the mixes) → `tensor_type_fallback`
(row lengths that do not divide the block size). This module follows those functions branch by
branch for the file types we write (quant_types.TYPES), with or without an importance matrix, with
no overrides, no experts and no fused QKV — the only inputs our architectures (qwen2, llama, clip)
can reach; branches for other architectures (Falcon) and for IQ1_* are left out. The tests compare it with llama.cpp on real files and, through
llama.cpp's exported `llama_quant_compute_types`, on a sweep of shapes and layer counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from ..quant_types import QuantType

# tensor_allows_quantization: name fragments of tensors that are never quantized (those our
# architectures can contain; the rest of upstream's list names other models' tensors)
NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", ".position_embd", ".patch_embd", ".patch_merger",
                   ".rel_pos", "attn_rel_b.weight")
UNQUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")  # LLM_TN(arch)(POS_EMBD / TOKEN_TYPES)
# tensor_type_fallback: a block-256 type whose row length does not divide 256 → this block-32 type
FALLBACK = {Q.IQ2_XXS: Q.IQ4_NL, Q.IQ2_XS: Q.IQ4_NL, Q.IQ2_S: Q.IQ4_NL, Q.IQ3_XXS: Q.IQ4_NL, Q.IQ3_S: Q.IQ4_NL,
            Q.IQ4_XS: Q.IQ4_NL, Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
IQ2_GROUP = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M")  # llama.cpp's very-low-bit branch (and IQ1_*, not ours)
LOW_OUTPUT = IQ2_GROUP + ("IQ3_XXS",)  # whose output (and tied token_embd) gets Q5_K, not Q6_K
UNQUANTIZED = (Q.F32, Q.F16, Q.BF16)  # the defaults for which ggml_is_quantized() is false


@dataclass(frozen=True)
class TensorInfo:
    """What llama.cpp's choice looks at: the GGUF name, ggml dims (ne[0] = row length), input type."""

    name: str
    ne: tuple[int, ...]
    type: Q


def block_size(t: Q) -> int:
    return GGML_QUANT_SIZES[t][0]


def allows_quantization(name: str, ne: Sequence[int]) -> bool:
    """tensor_allows_quantization with default parameters (quantize_output_tensor, not only_copy)."""
    return (_ggml_n_dims(ne) >= 2 and name.endswith("weight") and not any(f in name for f in NEVER_QUANTIZED)
            and name not in UNQUANTIZED_NAMES)


def category(name: str) -> str:
    """tensor_get_category, in its order of tests."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for fragment, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                          ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                          ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                          ("ffn_down", "ffn_down")):
        if fragment in name:
            return cat
    return "other"


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The _M mixes' choice of layers for one step more: the first and last eighth, every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def fallback(ncols: int, target: Q) -> Q:
    """tensor_type_fallback."""
    if ncols % block_size(target) == 0:
        return target
    chosen = FALLBACK.get(target, target)  # a block-32 type has nothing smaller: the F16 check decides
    return chosen if ncols % block_size(chosen) == 0 else Q.F16


def _ggml_n_dims(ne: Sequence[int]) -> int:
    """ggml_n_dims: the index of the last dimension above 1, plus one (at least 1)."""
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def choose_types(tensors: Sequence[TensorInfo], file_type: QuantType, n_layer: int, is_70b: bool,
                 n_gqa: int = 1, has_imatrix: bool = False) -> list[Q]:
    """The type of each tensor, ``tensors`` in the order llama.cpp's quantizer visits them
    (see `quantizer_order`); counters advance in that order, as upstream. ``n_gqa`` is
    n_head / n_head_kv (hparams.n_gqa()); a few rules change when an importance matrix is given."""
    default = file_type.base  # llama_ftype_get_default_type
    n_attention_wv = sum(1 for t in tensors if category(t.name) == "attn_v")  # init_quantize_state_counters
    state = {"tied": not any(category(t.name) == "output" for t in tensors), "wv": 0, "n_wv": n_attention_wv,
             "down": 0, "n_down": n_layer, "70b": is_70b, "gqa": n_gqa, "imatrix": has_imatrix}
    out = []
    for t in tensors:
        if not allows_quantization(t.name, t.ne):
            out.append(t.type)  # not allowed: stays as it is in the input
        elif default in UNQUANTIZED:
            out.append(default)
        else:
            out.append(fallback(t.ne[0], _mix(file_type.name, default, t, state)))
    return out


def _mix(ftype: str, new: Q, t: TensorInfo, st: dict) -> Q:
    """llama_tensor_get_type_impl for one tensor (``st`` holds the counters it advances)."""
    cat = category(t.name)
    if cat == "output" or (st["tied"] and cat == "token_embd"):
        if t.ne[0] % block_size(new) != 0:
            return Q.Q8_0
        if ftype in LOW_OUTPUT:
            return Q.Q5_K
        return Q.Q6_K if new != Q.Q8_0 else new
    if cat == "token_embd":
        return {"IQ2_XXS": Q.Q2_K, "IQ2_XS": Q.Q2_K, "IQ2_S": Q.IQ3_S, "IQ2_M": Q.IQ3_S, "IQ3_XXS": Q.IQ3_S}.get(ftype, new)
    if ftype in IQ2_GROUP:
        return _very_low_bit(ftype, new, cat, st)
    if cat == "attn_v":
        new = _attn_v(ftype, new, st)
        if st["70b"] and new in (Q.Q3_K, Q.Q4_K):
            new = Q.Q5_K
        st["wv"] += 1
        return new
    if cat in ("attn_k", "attn_q"):
        return Q.IQ2_S if ftype == "IQ3_XXS" else new
    if cat == "ffn_down":
        new = _ffn_down(ftype, new, st["down"], st["n_down"], st["imatrix"])
        st["down"] += 1
        return new
    if cat == "attn_output":
        return {"Q2_K": Q.Q3_K, "IQ3_XXS": Q.IQ3_S, "Q3_K_M": Q.Q4_K, "Q3_K_L": Q.Q5_K, "IQ3_M": Q.Q4_K}.get(ftype, new)
    return new


def _very_low_bit(ftype: str, new: Q, cat: str, st: dict) -> Q:
    """The IQ2_* branch: attn_v, the first eighth of ffn_down and attn_output get more bits."""
    more = Q.IQ3_S if ftype in ("IQ2_S", "IQ2_M") else Q.Q2_K
    if cat == "attn_v":
        st["wv"] += 1
        return Q.Q4_K if st["gqa"] >= 4 else more
    if cat == "ffn_down":
        st["down"] += 1
        return more if st["down"] - 1 < st["n_down"] // 8 else new
    if cat == "attn_output" and ftype in ("IQ2_S", "IQ2_M"):
        return Q.IQ3_S
    return new


def _attn_v(ftype: str, new: Q, st: dict) -> Q:
    gqa4, i = st["gqa"] >= 4, st["wv"]
    if ftype == "Q2_K":
        return Q.Q4_K if gqa4 else Q.Q3_K
    if ftype == "Q2_K_S" and gqa4:
        return Q.Q4_K
    if ftype == "IQ3_XXS":
        return Q.Q4_K if gqa4 else Q.IQ3_XXS if st["imatrix"] else Q.IQ3_S
    if ftype == "IQ3_S" and gqa4:
        return Q.Q4_K
    if ftype == "IQ3_M":
        return Q.Q4_K
    if ftype == "Q3_K_M":
        return Q.Q5_K if i < 2 else Q.Q4_K
    if ftype == "Q3_K_L":
        return Q.Q5_K
    if ftype in ("IQ4_NL", "IQ4_XS") and gqa4:
        return Q.Q5_K
    if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, st["n_wv"]):
        return Q.Q6_K
    if ftype == "Q4_K_S" and i < 4:
        return Q.Q5_K
    return new


def _ffn_down(ftype: str, new: Q, i: int, n: int, imatrix: bool) -> Q:
    if ftype == "Q2_K":
        return Q.Q3_K
    if ftype == "Q2_K_S":
        return Q.Q4_K if i < n // 8 else new
    if ftype == "IQ3_XXS" and not imatrix:
        return Q.Q4_K if i < n // 8 else Q.Q3_K
    if ftype == "Q3_K_M":
        return Q.Q5_K if i < n // 16 else Q.Q4_K
    if ftype == "IQ3_M" and i < n // 8:
        return Q.Q4_K
    if ftype == "Q3_K_L":
        return Q.Q5_K
    if ftype == "Q4_K_M":
        return Q.Q6_K if use_more_bits(i, n) else new
    if i < n // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not imatrix:
        return Q.Q5_K
    if ftype == "Q5_K_M" and use_more_bits(i, n):
        return Q.Q6_K
    if ftype == "Q4_K_S" and i < n // 8:
        return Q.Q5_K
    if ftype == "Q4_0" and imatrix and i < n // 8:  # guards the first layers against Q4_0's craziness
        return Q.Q4_1
    return new


def quantizer_order(names: Sequence[str]) -> list[str]:
    """The order of llama.cpp's quantizer output: its weights_map comparer (weight_name_comparer in
    src/llama-model-loader.h) sorts by the block number after a leading "blk." (-1 without one),
    then by name."""
    def key(name: str) -> tuple[int, str]:
        layer = -1
        if name.startswith("blk."):
            digits = name[4:].split(".", 1)[0]
            if digits.isdigit():
                layer = int(digits)
        return layer, name
    return sorted(names, key=key)
