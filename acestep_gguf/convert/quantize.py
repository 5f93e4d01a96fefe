"""llama.cpp's own quantizer, wrapped: type names, thread count, progress from its log, clear errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import llama_cpp

from .. import llama_log
from ..errors import QuantizeError
from ..system import default_threads

# llama.cpp's type names → its llama_ftype values.
LANGUAGE_TYPES = {
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "BF16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
}
VISION_TYPES = {"F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}
ALL_QUANTIZED = ("Q4_K_M", "Q5_K_M", "Q8_0")
_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")


def quantize(src: Path, dst: Path, type_name: str, *, threads: int | None = None, verbose: bool = False,
             on_tensor: Callable[[int, int], None] = lambda done, total: None) -> None:
    """Write ``dst`` as ``type_name`` from the lossless GGUF ``src``; ``on_tensor(i, n)`` follows progress."""
    ftype = LANGUAGE_TYPES[type_name]
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or default_threads()
    params.ftype = ftype

    def follow(line: str) -> None:
        match = _TENSOR_LINE.search(line)
        if match:
            on_tensor(int(match.group(1)), int(match.group(2)))

    with llama_log.listening(follow, verbose):
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if status != 0:
        raise QuantizeError(f"{dst.name}: llama.cpp's quantizer failed for {type_name} ({llama_log.recent()})")
