"""Which ggml type each tensor gets in a quantized file: llama.cpp 0.3.36's own choice, mirrored.

`llama_model_quantize` (vendor/llama.cpp/src/llama-quant.cpp) decides per tensor in
`llama_model_quantize_impl`'s preliminary loop: `tensor_allows_quantization`, then
`llama_tensor_get_type` → `llama_tensor_get_type_impl` (the _M mixes) → `tensor_type_fallback`
(row lengths that do not divide the block size). This module follows those functions branch by
branch for the file types we write (Q4_K_M, Q5_K_M, Q8_0, F16, BF16), with no overrides, no
imatrix and no experts — the only inputs our architectures (qwen2, llama, clip) can reach. The
tests compare it with llama.cpp on real files and, through llama.cpp's exported
`llama_quant_compute_types`, on a sweep of shapes and layer counts."""

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
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
QUANTIZED_DEFAULTS = (Q.Q4_K, Q.Q5_K, Q.Q8_0)  # ggml_is_quantized() among our defaults


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


def choose_types(tensors: Sequence[TensorInfo], file_type: QuantType, n_layer: int, is_70b: bool) -> list[Q]:
    """The type of each tensor, ``tensors`` in the order llama.cpp's quantizer visits them
    (see `quantizer_order`); counters advance in that order, as upstream."""
    default = file_type.base  # llama_ftype_get_default_type
    ftype = file_type.name
    n_attention_wv = sum(1 for t in tensors if category(t.name) == "attn_v")  # init_quantize_state_counters
    tied = not any(category(t.name) == "output" for t in tensors)
    n_ffn_down = n_layer
    i_attention_wv = i_ffn_down = 0
    out = []
    for t in tensors:
        if not allows_quantization(t.name, t.ne):
            out.append(t.type)  # not allowed: stays as it is in the input
            continue
        new = default
        if default in QUANTIZED_DEFAULTS:
            cat = category(t.name)
            if cat == "output" or (tied and cat == "token_embd"):
                if t.ne[0] % block_size(new) != 0:
                    new = Q.Q8_0
                elif new != Q.Q8_0:
                    new = Q.Q6_K
            elif cat == "token_embd":
                pass
            elif cat == "attn_v":
                if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_attention_wv, n_attention_wv):
                    new = Q.Q6_K
                if is_70b and new in (Q.Q3_K, Q.Q4_K):
                    new = Q.Q5_K
                i_attention_wv += 1
            elif cat == "ffn_down":
                if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_ffn_down, n_ffn_down):
                    new = Q.Q6_K
                i_ffn_down += 1
            new = fallback(t.ne[0], new)
        out.append(new)
    return out


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
