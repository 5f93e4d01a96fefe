"""Strict reading of safetensors headers, and memory-mapped access to their tensors.

The header is validated in full before any tensor is touched: a malformed or hostile file must
fail here, naming the file and tensor, not later as a wrong GGUF or a crash in numpy."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, TensorError
from ..files import open_regular

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the same cap as the safetensors library
MAX_DIMS = 8
ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# What each supported dtype is read as; BF16 has no numpy type and stays raw 16-bit words.
NUMPY_VIEW = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}


@dataclass(frozen=True)
class SourceTensor:
    """One tensor inside a safetensors file: its location, never its data."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def _no_duplicates(path: Path):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise CheckpointError(f"{path.name}: tensor {key!r} appears twice in the header")
            seen.add(key)
        return dict(pairs)
    return hook


def read_header(path: Path) -> dict[str, SourceTensor]:
    """All tensors of one file, after checking the header describes exactly the bytes that follow it."""
    with open_regular(path, CheckpointError, "safetensors file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n + 8 > size:
            raise CheckpointError(f"{path.name}: not a safetensors file (header length {n} is impossible "
                                  f"for a {size}-byte file)")
        raw = f.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates(path))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, the int-digit limit
        raise CheckpointError(f"{path.name}: not a safetensors file (header is not JSON: "
                              f"{str(e).splitlines()[0][:160]})") from None
    except RecursionError:
        raise CheckpointError(f"{path.name}: not a safetensors file (header JSON is nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    data_start, data_len = 8 + n, size - 8 - n
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _tensor(path, name, entry, data_start)
    spans = sorted(tensors.values(), key=lambda t: (t.start, t.nbytes))
    cursor = data_start
    for t in spans:
        if t.start != cursor:
            what = "overlaps the previous tensor" if t.start < cursor else "leaves a gap before it"
            raise CheckpointError(f"{path.name}: tensor {t.name!r} {what} (data_offsets are not contiguous)")
        cursor = t.start + t.nbytes
    if cursor != data_start + data_len:
        raise CheckpointError(f"{path.name}: the header describes {cursor - data_start} data bytes but the file "
                              f"holds {data_len} (truncated or padded file)")
    return tensors


def _tensor(path: Path, name: str, entry, data_start: int) -> SourceTensor:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path.name}: tensor {name!r} has a malformed header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ITEM_BYTES:
        raise CheckpointError(f"{path.name}: tensor {name!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(type(d) is int and 0 <= d < 1 << 40 for d in shape)):
        raise CheckpointError(f"{path.name}: tensor {name!r} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path.name}: tensor {name!r} has malformed data_offsets {offsets!r}")
    nbytes = offsets[1] - offsets[0]
    if nbytes != math.prod(shape) * ITEM_BYTES[dtype]:
        raise CheckpointError(f"{path.name}: tensor {name!r} spans {nbytes} bytes but {dtype} x {shape} "
                              f"needs {math.prod(shape) * ITEM_BYTES[dtype]}")
    return SourceTensor(name, path, dtype, tuple(shape), data_start + offsets[0], nbytes)


class TensorReader:
    """Reads tensors in bounded chunks into one reusable buffer: no page-fault storm from a memory
    map, and memory that stays the size of one chunk whatever the model size."""

    def __init__(self, chunk_bytes: int = 32 << 20):
        self._files: dict[Path, object] = {}
        self._buffer = bytearray(chunk_bytes)

    @property
    def chunk_bytes(self) -> int:
        return len(self._buffer)

    def chunks(self, t: SourceTensor, row: int = 1):
        """Yield consecutive views of the tensor's elements (each valid until the next one), each a
        whole number of ``row``-element rows (one row at least, even if larger than the buffer)."""
        if t.dtype not in NUMPY_VIEW:
            raise TensorError(f"{t.file.name}: tensor {t.name!r} has dtype {t.dtype}; only BF16, F16 and F32 are supported")
        f = self._files.get(t.file)
        if f is None:
            f = self._files[t.file] = open_regular(t.file, CheckpointError, "safetensors file")
        item = ITEM_BYTES[t.dtype]
        unit = item * max(1, row)
        if unit > len(self._buffer):
            self._buffer = bytearray(unit)
        step = len(self._buffer) // unit * unit
        f.seek(t.start)
        view = memoryview(self._buffer)
        for done in range(0, t.nbytes, step):
            n = min(step, t.nbytes - done)
            got = f.readinto(view[:n])
            if got != n:
                raise TensorError(f"{t.file.name}: tensor {t.name!r} is cut short (the file changed while reading?)")
            yield np.frombuffer(self._buffer, dtype=NUMPY_VIEW[t.dtype], count=n // item)

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()
