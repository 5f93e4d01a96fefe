"""The one table of output types: what the converter accepts, the manifest prefers, the planner sizes
and a GGUF's ``general.file_type`` means. Names and block sizes are llama.cpp's (via gguf-py)."""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, LlamaFileType as F


@dataclass(frozen=True)
class QuantType:
    name: str  # llama.cpp's name, as users type it
    file_type: F  # general.file_type / llama_ftype
    base: Q  # most weight matrices (llama_ftype_get_default_type); the exceptions: convert/tensor_types.py
    bits_per_weight: float  # for the free-space estimate only
    needs_imatrix: bool = False  # llama.cpp makes it only with an importance matrix


# `base` is llama_ftype_get_default_type; the per-tensor exceptions are convert/tensor_types.py's (a
# mirror of llama.cpp's rules). The last six need an importance matrix (`convert --imatrix FILE`), as
# llama-quantize demands one for them (IQ3_XXS: its attn_q/attn_k become IQ2_S).
TYPES = {t.name: t for t in (
    QuantType("Q2_K", F.MOSTLY_Q2_K, Q.Q2_K, 3.0),
    QuantType("Q3_K_S", F.MOSTLY_Q3_K_S, Q.Q3_K, 3.5),
    QuantType("Q3_K_M", F.MOSTLY_Q3_K_M, Q.Q3_K, 3.9),
    QuantType("Q3_K_L", F.MOSTLY_Q3_K_L, Q.Q3_K, 4.3),
    QuantType("IQ3_S", F.MOSTLY_IQ3_S, Q.IQ3_S, 3.6),
    QuantType("IQ3_M", F.MOSTLY_IQ3_M, Q.IQ3_S, 3.8),
    QuantType("IQ4_XS", F.MOSTLY_IQ4_XS, Q.IQ4_XS, 4.5),
    QuantType("IQ4_NL", F.MOSTLY_IQ4_NL, Q.IQ4_NL, 4.7),
    QuantType("Q4_0", F.MOSTLY_Q4_0, Q.Q4_0, 4.6),
    QuantType("Q4_K_S", F.MOSTLY_Q4_K_S, Q.Q4_K, 4.7),
    QuantType("Q4_K_M", F.MOSTLY_Q4_K_M, Q.Q4_K, 4.9),
    QuantType("Q5_K_S", F.MOSTLY_Q5_K_S, Q.Q5_K, 5.6),
    QuantType("Q5_K_M", F.MOSTLY_Q5_K_M, Q.Q5_K, 5.7),
    QuantType("Q6_K", F.MOSTLY_Q6_K, Q.Q6_K, 6.6),
    QuantType("Q8_0", F.MOSTLY_Q8_0, Q.Q8_0, 8.5),
    QuantType("F16", F.MOSTLY_F16, Q.F16, 16.0),
    QuantType("BF16", F.MOSTLY_BF16, Q.BF16, 16.0),
    QuantType("IQ2_XXS", F.MOSTLY_IQ2_XXS, Q.IQ2_XXS, 2.1, True),
    QuantType("IQ2_XS", F.MOSTLY_IQ2_XS, Q.IQ2_XS, 2.3, True),
    QuantType("IQ2_S", F.MOSTLY_IQ2_S, Q.IQ2_XS, 2.5, True),
    QuantType("IQ2_M", F.MOSTLY_IQ2_M, Q.IQ2_S, 2.7, True),
    QuantType("IQ3_XXS", F.MOSTLY_IQ3_XXS, Q.IQ3_XXS, 3.1, True),
    QuantType("Q2_K_S", F.MOSTLY_Q2_K_S, Q.Q2_K, 2.8, True),
)}
ALL_QUANTIZED = ("Q4_K_M", "Q5_K_M", "Q8_0")  # what `--quant all` means
NOT_OFFERED = ("IQ1_S", "IQ1_M", "IQ3_XS")  # llama.cpp types we do not write
# largest (closest to the checkpoint) first: what `plan --best` tries in turn
BY_QUALITY = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "IQ4_NL", "Q4_0", "IQ4_XS", "Q3_K_L", "Q3_K_M",
              "IQ3_M", "IQ3_S", "Q3_K_S", "IQ3_XXS", "Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS")
# best first, when none is asked for: the usual trade-off first, then up, then down the ladder
LANGUAGE_PREFERENCE = ("Q4_K_M", "Q5_K_M", "Q8_0", "Q6_K", "Q5_K_S", "Q4_K_S", "IQ4_XS", "IQ4_NL", "Q4_0", "Q3_K_L",
                       "Q3_K_M", "IQ3_M", "IQ3_S", "Q3_K_S", "IQ3_XXS", "Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS",
                       "IQ2_XXS", "F16", "BF16")
VISION_PREFERENCE = ("F16", "Q8_0")
VISION_TYPES = ("F16", "Q8_0")  # offered for the vision projector


def name_of_file_type(value) -> str:
    """'Q4_K_M' for general.file_type 15; the number itself for types we do not write."""
    return next((t.name for t in TYPES.values() if t.file_type == value), str(value))


def tensor_bytes(qtype: Q, n_elements: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return n_elements // block * size
