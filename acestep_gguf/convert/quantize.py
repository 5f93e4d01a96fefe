"""llama.cpp's own quantizer, wrapped: type names, thread count, progress from its log, clear errors."""

from __future__ import annotations

import ctypes

import re
import shutil
import threading
from pathlib import Path
from typing import Callable

import llama_cpp

from .. import interrupts, llama_log
from ..errors import OutputError, QuantizeError
from ..quant_types import TYPES
from ..system import default_threads

DISK_FULL = 64 << 20  # free bytes under which a failed write is reported as a full disk
_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")


def quantize(src: Path, dst: Path, type_name: str, *, threads: int | None = None, verbose: bool = False,
             on_tensor: Callable[[int, int], None] = lambda done, total: None, imatrix=None) -> None:
    """Write ``dst`` as ``type_name`` from the lossless GGUF ``src``; ``on_tensor(i, n)`` follows progress.
    ``imatrix`` (convert/imatrix.py) is handed over as llama-quantize hands it: the data, and its
    quantize.imatrix.* keys as KV overrides."""
    ftype = int(TYPES[type_name].file_type)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or default_threads()
    params.ftype = ftype
    keep = []  # what the C structs point into, alive for the call
    if imatrix is not None:
        names = sorted(imatrix.entries)
        rows = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
        for i, n in enumerate(names):
            values = imatrix.entries[n]
            keep += [n.encode(), values]
            rows[i].name, rows[i].size = keep[-2], values.size
            rows[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        overrides = (llama_cpp.llama_model_kv_override * (len(imatrix.metadata()) + 1))()
        for o, entry in zip(overrides, imatrix.metadata()):
            o.key = entry.key.encode()
            if isinstance(entry.value, str):
                o.tag, o.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, entry.value.encode()[:127]
            else:
                o.tag, o.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, entry.value
        keep += [rows, overrides]
        params.imatrix = ctypes.cast(rows, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))

    def follow(line: str) -> None:
        match = _TENSOR_LINE.search(line)
        if match:
            on_tensor(int(match.group(1)), int(match.group(2)))

    with llama_log.listening(follow, verbose):
        status = run_interruptible(lambda: llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params))
    if status != 0:
        free = shutil.disk_usage(dst.parent).free
        if free < DISK_FULL:
            raise OutputError(f"{dst.parent}: no space left on device while writing {dst.name} ({free >> 20} MiB free)")
        raise QuantizeError(f"{dst.name}: llama.cpp's quantizer failed for {type_name} ({llama_log.recent()})")


def run_interruptible(call: Callable[[], int]) -> int:
    """Run a long C call in a worker thread so that Ctrl-C is seen at once in the main thread
    (llama.cpp's quantizer cannot be cancelled: after an interrupt the worker finishes on its own,
    writing only to a partial file that the caller deletes)."""
    result: list = []
    worker = threading.Thread(target=lambda: result.append(call()), name="llama-quantize", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
        if interrupts.pending():
            llama_log.mute()  # the worker runs on to its end: nothing of it may follow "interrupted"
        interrupts.check()
    return result[0] if result else -1
