"""The one table of output types: what the converter accepts, the manifest prefers, the planner sizes
and a GGUF's ``general.file_type`` means. Names and block sizes are llama.cpp's (via gguf-py)."""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, LlamaFileType as F


@dataclass(frozen=True)
class QuantType:
    name: str  # llama.cpp's name, as users type it
    file_type: F  # general.file_type / llama_ftype
    base: Q  # most weight matrices
    more_bits: Q  # attn_v and ffn_down in the layers llama.cpp's use_more_bits picks (the _M mixes)
    output: Q  # output.weight
    bits_per_weight: float  # for the free-space estimate only


TYPES = {t.name: t for t in (
    QuantType("Q4_K_M", F.MOSTLY_Q4_K_M, Q.Q4_K, Q.Q6_K, Q.Q6_K, 4.9),
    QuantType("Q5_K_M", F.MOSTLY_Q5_K_M, Q.Q5_K, Q.Q6_K, Q.Q6_K, 5.7),
    QuantType("Q8_0", F.MOSTLY_Q8_0, Q.Q8_0, Q.Q8_0, Q.Q8_0, 8.5),
    QuantType("F16", F.MOSTLY_F16, Q.F16, Q.F16, Q.F16, 16.0),
    QuantType("BF16", F.MOSTLY_BF16, Q.BF16, Q.BF16, Q.BF16, 16.0),
)}
ALL_QUANTIZED = ("Q4_K_M", "Q5_K_M", "Q8_0")  # what `--quant all` means
LANGUAGE_PREFERENCE = ("Q4_K_M", "Q5_K_M", "Q8_0", "F16", "BF16")  # best first, when none is asked for
VISION_PREFERENCE = ("F16", "Q8_0")
VISION_TYPES = ("F16", "Q8_0")  # offered for the vision projector


def name_of_file_type(value) -> str:
    """'Q4_K_M' for general.file_type 15; the number itself for types we do not write."""
    return next((t.name for t in TYPES.values() if t.file_type == value), str(value))


def tensor_bytes(qtype: Q, n_elements: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return n_elements // block * size
