"""A fast, strict read of a GGUF file's header: metadata, their types, and tensor infos.

Fast: the 150k-entry tokenizer arrays are scanned, not decoded into Python lists (gguf-py's reader
takes ~7 s on a Qwen2 vocabulary). Strict: the file is untrusted, so every count and length is
checked against the bytes left before it is used, arrays of arrays are refused (as ggml does),
tensor shapes, types, alignment and data extents are checked against the file size, and every
failure is one ModelFilesError line, never an OverflowError, MemoryError or RecursionError."""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import ModelFilesError
from ..files import open_regular

SCALARS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
           GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
           GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
           GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}
LONG = 1024  # arrays longer than this are counted (and scanned), not decoded
TOKENS = "tokenizer.ggml.tokens"  # the one string array whose repeated texts matter (llama.cpp aborts)
MAX_KEY = 1 << 16
MAX_STRING = 64 << 20
MAX_ITEMS = 1 << 26  # entries in one metadata array
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class LongArray:
    """An array left undecoded (a tokenizer's tokens or merges): its length, and for string arrays
    the first text that occurs twice (llama.cpp aborts on a vocabulary with one)."""

    count: int
    duplicate: str | None = None  # looked for in the token list only


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order (ne0 first)
    type: GGMLQuantizationType
    n_bytes: int
    offset: int = 0  # where its data starts in the file


@dataclass
class GGUFHeader:
    fields: dict
    types: dict  # key -> (GGUFValueType, element GGUFValueType or None)
    tensors: list[TensorInfo]


class _Malformed(Exception):
    pass


def read_header(path: Path, role: str = "GGUF") -> GGUFHeader:
    path = Path(path)
    with open_regular(path, ModelFilesError, f"{role} file") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ModelFilesError(f"{path}: not a GGUF file ({size} bytes)")
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return _Parser(m, size).header()
        except _Malformed as e:
            raise ModelFilesError(f"{path}: not a valid GGUF file ({e})") from None
        except (OSError, ValueError) as e:
            raise ModelFilesError(f"{path}: cannot read ({e})") from None


class _Parser:
    def __init__(self, m, size: int):
        self.m, self.size, self.pos = m, size, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Malformed(f"{what} at byte {self.pos} runs past the end of the file")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        values = struct.unpack_from(fmt, self.m, self.pos)
        self.pos += n
        return values if len(values) > 1 else values[0]

    def string(self, what: str, limit: int = MAX_STRING) -> bytes:
        n = self.unpack("<Q", f"length of {what}")
        if n > limit:
            raise _Malformed(f"{what} claims {n} bytes (limit {limit})")
        self.need(n, what)
        raw = bytes(self.m[self.pos:self.pos + n])
        self.pos += n
        return raw

    def header(self) -> GGUFHeader:
        if self.m[:4] != b"GGUF":
            raise _Malformed("bad magic")
        self.pos = 4
        version, n_tensors, n_kv = self.unpack("<IQQ", "header")
        if version not in (2, 3):
            raise _Malformed(f"GGUF version {version} is not 2 or 3")
        left = self.size - self.pos
        if n_kv > left // 12:  # each entry takes at least a key length and a type
            raise _Malformed(f"{n_kv} metadata entries cannot fit in {left} bytes")
        if n_tensors > left // 28:  # name length, n_dims, one dim, type, offset
            raise _Malformed(f"{n_tensors} tensors cannot fit in {left} bytes")
        fields, types = {}, {}
        for _ in range(n_kv):
            try:
                key = self.string("a metadata key", MAX_KEY).decode("utf-8")
            except UnicodeDecodeError:
                raise _Malformed(f"a metadata key before byte {self.pos} is not UTF-8") from None
            if key in fields:
                raise _Malformed(f"metadata key {key!r} appears twice")
            vtype = self.value_type(self.unpack("<I", f"type of {key}"), key)
            fields[key], types[key] = self.value(key, vtype)
        alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if types.get("general.alignment", (GGUFValueType.UINT32,))[0] != GGUFValueType.UINT32 \
                or alignment == 0 or alignment & (alignment - 1):
            raise _Malformed(f"general.alignment {alignment!r} is not a power of two")
        infos = [self.tensor_info() for _ in range(n_tensors)]
        data_start = -(-self.pos // alignment) * alignment
        tensors, seen = [], set()
        for name, shape, ttype, offset, n_bytes in infos:
            if name in seen:
                raise _Malformed(f"tensor {name!r} appears twice")
            seen.add(name)
            if offset % alignment or data_start + offset + n_bytes > self.size:
                raise _Malformed(f"tensor {name!r} data ({n_bytes} bytes at offset {offset}) lies outside the file "
                                 "or is misaligned")
            tensors.append(TensorInfo(name, shape, ttype, n_bytes, data_start + offset))
        return GGUFHeader(fields, types, tensors)

    @staticmethod
    def value_type(raw: int, key: str) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise _Malformed(f"{key} has unknown value type {raw}") from None

    def value(self, key: str, vtype: GGUFValueType):
        if vtype in SCALARS:
            return self.unpack(SCALARS[vtype], key), (vtype, None)
        if vtype == GGUFValueType.STRING:
            return self.string(key).decode("utf-8", errors="replace"), (vtype, None)
        etype = self.value_type(self.unpack("<I", f"element type of {key}"), key)
        count = self.unpack("<Q", f"length of {key}")
        if etype == GGUFValueType.ARRAY:
            raise _Malformed(f"{key} is an array of arrays (ggml refuses them)")
        if count > MAX_ITEMS:
            raise _Malformed(f"{key} claims {count} entries")
        if etype in SCALARS:
            fmt = SCALARS[etype]
            width = struct.calcsize(fmt)
            self.need(width * count, key)
            if count > LONG:
                self.pos += width * count
                return LongArray(count), (vtype, etype)
            items = list(struct.unpack_from(f"<{count}{fmt[1]}", self.m, self.pos))
            self.pos += width * count
            return items, (vtype, etype)
        if count > (self.size - self.pos) // 8:
            raise _Malformed(f"{key} claims {count} strings, more than the file can hold")
        return self.strings(key, count), (vtype, etype)

    def strings(self, key: str, count: int):
        seen: dict[bytes, int] = {}
        duplicate, items, scan = None, [], key == TOKENS
        for i in range(count):
            raw = self.string(f"{key}[{i}]") or f"[EMPTY_{i}]".encode()
            if count <= LONG:
                items.append(raw.decode("utf-8", errors="replace"))
            if scan and duplicate is None:
                if raw in seen:
                    duplicate = f"{raw.decode('utf-8', errors='replace')!r} at {seen[raw]} and {i}"
                seen[raw] = i
        return items if count <= LONG else LongArray(count, duplicate)

    def tensor_info(self):
        try:
            name = self.string("a tensor name", MAX_KEY).decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed(f"a tensor name before byte {self.pos} is not UTF-8") from None
        n_dims = self.unpack("<I", f"dimensions of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Malformed(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
        shape = tuple(self.unpack(f"<{n_dims}Q", f"shape of {name}")) if n_dims > 1 else (self.unpack("<Q", name),)
        raw_type, offset = self.unpack("<IQ", f"type of {name}")
        try:
            ttype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[ttype]
        except (ValueError, KeyError):
            raise _Malformed(f"tensor {name!r} has unknown type {raw_type}") from None
        n = 1
        for d in shape:
            if not 1 <= d < 1 << 40:
                raise _Malformed(f"tensor {name!r} has dimension {d}")
            n *= d
        if shape[0] % block or n > 1 << 48:
            raise _Malformed(f"tensor {name!r} shape {list(shape)} does not fit type {ttype.name}")
        return name, shape, ttype, offset, n // block * type_size


FLOAT_TYPES = {GGMLQuantizationType.F32: "<f4", GGMLQuantizationType.F16: "<f2"}


def read_float_tensor(path: Path, info: TensorInfo) -> np.ndarray:
    """A small F32 or F16 tensor's values as float32 (read_header has checked it lies inside the file)."""
    if info.type not in FLOAT_TYPES:
        raise ModelFilesError(f"{path}: tensor {info.name} is {info.type.name}; F32 or F16 expected")
    with open_regular(path, ModelFilesError, "GGUF file") as f:
        f.seek(info.offset)
        data = f.read(info.n_bytes)
    if len(data) != info.n_bytes:
        raise ModelFilesError(f"{path}: tensor {info.name} is cut short")
    return np.frombuffer(data, FLOAT_TYPES[info.type]).astype(np.float32).reshape(tuple(reversed(info.shape)))
