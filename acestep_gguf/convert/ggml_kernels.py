"""ggml's own quantization kernels, called through ctypes from the libggml-base that llama-cpp-python
ships: the very code `llama_model_quantize` runs, so the bytes are the same by construction.

ctypes releases the GIL for the duration of each call, so row ranges quantize in parallel threads.
Every precondition ggml asserts on (block-aligned rows, buffer sizes) is checked here first: a
mistake must be a Python exception, never an abort inside the library."""

from __future__ import annotations

import ctypes
import pathlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGMLQuantizationType as Q

from ..errors import TensorError
from .tensor_types import block_size

_lib = None


def _library():
    global _lib
    if _lib is None:
        import llama_cpp  # loads libllama, and with it libggml-base
        from llama_cpp._ctypes_extensions import load_shared_library
        lib = load_shared_library("ggml-base", pathlib.Path(llama_cpp.__file__).resolve().parent / "lib")
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        lib.ggml_validate_row_data.restype = ctypes.c_bool
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        lib.ggml_quantize_init.restype = None
        _lib = lib
    return _lib


def row_size(qtype: Q, n_per_row: int) -> int:
    return int(_library().ggml_row_size(int(qtype), n_per_row))


class Quantizer:
    """Quantizes F32 rows into a ggml type with ``threads`` threads (one pool for a whole conversion)."""

    def __init__(self, threads: int):
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ggml-quantize") if self.threads > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "Quantizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rows(self, qtype: Q, rows: np.ndarray, tensor: str, weights: np.ndarray | None = None) -> np.ndarray:
        """``rows`` (2-D, float32, C-contiguous) as ``qtype`` bytes, validated as llama.cpp validates
        them; ``tensor`` names the tensor in messages; ``weights``: the importance of each column (an
        imatrix entry), which the low-bit kernels use and the others ignore."""
        lib = _library()
        if rows.ndim != 2 or rows.dtype != np.float32 or not rows.flags.c_contiguous:
            raise ValueError("rows must be a C-contiguous 2-D float32 array")
        n_rows, n_per_row = rows.shape
        if n_per_row % block_size(qtype):
            raise TensorError(f"{tensor}: rows of {n_per_row} cannot be stored as {qtype.name}")
        if weights is None and lib.ggml_quantize_requires_imatrix(int(qtype)):
            raise TensorError(f"{tensor}: {qtype.name} needs an importance matrix entry for it (--imatrix)")
        if weights is not None and (weights.dtype != np.float32 or weights.size != n_per_row):
            raise ValueError("weights must be float32, one per column")
        imatrix = weights.ctypes.data if weights is not None else None
        lib.ggml_quantize_init(int(qtype))  # once, here: its tables are built before any worker starts
        size = row_size(qtype, n_per_row)
        out = np.empty(n_rows * size, dtype=np.uint8)
        src, dst = rows.ctypes.data, out.ctypes.data

        def part(first: int, count: int) -> bool:
            written = lib.ggml_quantize_chunk(int(qtype), src, dst, first * n_per_row, count, n_per_row, imatrix)
            return written == count * size and lib.ggml_validate_row_data(int(qtype), dst + first * size, written)

        parts = self.threads if self._pool is not None and n_rows * n_per_row >= 1 << 16 else 1
        bounds = [n_rows * i // parts for i in range(parts + 1)]
        spans = [(a, b - a) for a, b in zip(bounds, bounds[1:]) if b > a]
        results = list(self._pool.map(lambda s: part(*s), spans)) if parts > 1 else [part(*s) for s in spans]
        if not all(results):
            # what llama.cpp reports as "quantized data validation failed": a value out of the type's
            # range (an F16 overflow), or a non-finite scale
            raise TensorError(f"{tensor}: its values do not fit {qtype.name} (out of range after conversion); "
                              "choose another --quant")
        return out
