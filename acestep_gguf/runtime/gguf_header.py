"""A fast read of a GGUF file's header: metadata and tensor infos, without the 150k-entry tokenizer
arrays. gguf-py's GGUFReader builds a numpy view per array element (about 7 s for a Qwen2
vocabulary); loading a chat should not wait for that. The converter still verifies with gguf-py."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import ModelFilesError

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
LONG = 1024  # arrays longer than this are counted, not decoded


@dataclass(frozen=True)
class LongArray:
    """An array left undecoded (a tokenizer's tokens or merges): only its length."""

    count: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order (ne0 first)
    type: GGMLQuantizationType
    n_bytes: int


@dataclass
class GGUFHeader:
    fields: dict
    tensors: list[TensorInfo]


def read_header(path: Path, role: str = "GGUF") -> GGUFHeader:
    path = Path(path)
    if not path.is_file():
        raise ModelFilesError(f"{path}: no such {role} file")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _parse(m)
    except (ValueError, struct.error, UnicodeDecodeError, KeyError) as e:
        raise ModelFilesError(f"{path}: not a readable GGUF file ({e})") from None


def _parse(m) -> GGUFHeader:
    if m[:4] != b"GGUF":
        raise ValueError("bad magic")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    pos = 24
    fields = {}
    for _ in range(n_kv):
        key, pos = _string(m, pos)
        (vtype,), pos = struct.unpack_from("<I", m, pos), pos + 4
        fields[key], pos = _value(m, pos, vtype)
    tensors = []
    for _ in range(n_tensors):
        name, pos = _string(m, pos)
        (n_dims,), pos = struct.unpack_from("<I", m, pos), pos + 4
        shape = struct.unpack_from(f"<{n_dims}Q", m, pos)
        pos += 8 * n_dims
        ttype, _offset = struct.unpack_from("<IQ", m, pos)
        pos += 12
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        n = 1
        for d in shape:
            n *= d
        tensors.append(TensorInfo(name, tuple(shape), GGMLQuantizationType(ttype), n // block * size))
    return GGUFHeader(fields, tensors)


def _string(m, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", m, pos)
    return bytes(m[pos + 8:pos + 8 + n]).decode("utf-8"), pos + 8 + n


def _value(m, pos: int, vtype: int):
    if vtype in SCALARS:
        fmt = SCALARS[vtype]
        return struct.unpack_from(fmt, m, pos)[0], pos + struct.calcsize(fmt)
    if vtype == STRING:
        return _string(m, pos)
    if vtype != ARRAY:
        raise ValueError(f"unknown metadata type {vtype}")
    etype, count = struct.unpack_from("<IQ", m, pos)
    pos += 12
    if etype in SCALARS:
        fmt = SCALARS[etype]
        width = struct.calcsize(fmt)
        if count > LONG:
            return LongArray(count), pos + width * count
        return list(struct.unpack_from(f"<{count}{fmt[1]}", m, pos)), pos + width * count
    items = []
    for _ in range(count):
        item, pos = _value(m, pos, etype)
        if count <= LONG:
            items.append(item)
    return (items if count <= LONG else LongArray(count)), pos
