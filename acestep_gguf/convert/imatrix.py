"""Importance matrices (`convert --imatrix FILE`): llama.cpp's GGUF imatrix files and the legacy `.dat`
files publishers ship, read as `llama-quantize` reads them (tools/quantize/quantize.cpp,
load_imatrix: per-column sums of squared activations divided by their token counts, in float32), and
checked against the model they are applied to before a single tensor is quantized: every entry must
name one of its weights with the right width, every layer's weights must have one, every value must
be finite. An untrusted file: every count, length and size is bounded by the bytes that are there."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFValueType as T

from ..errors import AcestepGGUFError
from ..files import read_bytes
from ..models.spec import MetadataEntry

MAX_IMATRIX_BYTES = 4 << 30
MAX_NAME = 512


class ImatrixError(AcestepGGUFError):
    """An importance-matrix file that cannot be used (malformed, foreign, not finite)."""


@dataclass(frozen=True)
class Imatrix:
    path: str  # as given: llama-quantize records it so
    entries: dict  # weight name -> float32 importance per input column
    datasets: tuple
    chunks: int
    sha256: str

    def metadata(self) -> list[MetadataEntry]:
        """The keys llama-quantize adds (as KV overrides, so after general.file_type), same types and
        the same 127-character cut of its strings."""
        out = [MetadataEntry("quantize.imatrix.file", self.path[:127], T.STRING)]
        if self.datasets:
            out.append(MetadataEntry("quantize.imatrix.dataset", self.datasets[0][:127], T.STRING))
        out.append(MetadataEntry("quantize.imatrix.entries_count", len(self.entries), T.UINT32))
        if self.chunks > 0:
            out.append(MetadataEntry("quantize.imatrix.chunks_count", self.chunks, T.UINT32))
        return out

    def check(self, weights: dict[str, int], where: str) -> None:
        """``weights``: every weight the quantizer may give an importance (name -> row length)."""
        for name, values in self.entries.items():
            if name not in weights:
                raise ImatrixError(f"{self.path}: entry {name[:80]!r} names no weight of {where} (an importance "
                                   "matrix of another model?)")
            if values.size != weights[name]:
                raise ImatrixError(f"{self.path}: entry {name!r} has {values.size} columns but the weight's rows have "
                                   f"{weights[name]} (another model?)")
        missing = [n for n in weights if n.startswith("blk.") and n not in self.entries]
        if missing:
            raise ImatrixError(f"{self.path}: no entry for {missing[0]}" + (f" and {len(missing) - 1} more" if
                               len(missing) > 1 else "") + f" of {where} (an imatrix of another model, or cut short?)")


def read_imatrix(path: str | Path) -> Imatrix:
    given = str(path)
    data = read_bytes(Path(path).expanduser(), ImatrixError, MAX_IMATRIX_BYTES, "imatrix file")
    digest = hashlib.sha256(data).hexdigest()
    try:
        if data[:4] == b"GGUF":
            entries, datasets, chunks = _gguf(data, given)
        else:
            entries, datasets, chunks = _legacy(data, given)
    except (struct.error, ValueError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise ImatrixError(f"{given}: not a valid importance matrix ({str(e).splitlines()[0][:120] or type(e).__name__})") \
            from None
    if not entries:
        raise ImatrixError(f"{given}: holds no importance entries")
    for name, values in entries.items():
        if not np.isfinite(values).all():
            raise ImatrixError(f"{given}: entry {name!r} holds non-finite values")
    return Imatrix(given, entries, tuple(datasets), chunks, digest)


def _gguf(data: bytes, given: str) -> tuple[dict, list, int]:
    import tempfile

    from gguf import GGUFReader
    with tempfile.NamedTemporaryFile(suffix=".gguf") as tmp:  # GGUFReader maps a file
        tmp.write(data)
        tmp.flush()
        try:
            reader = GGUFReader(tmp.name)
        except Exception as e:  # gguf-py raises ValueError, struct/IndexError, ... on malformed headers
            raise ValueError(f"GGUF header: {str(e).splitlines()[0][:100] if str(e) else type(e).__name__}") from None
        fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        if fields.get("general.type") != "imatrix":
            raise ValueError("general.type is not 'imatrix'")
        tensors = {t.name: t for t in reader.tensors}
        entries = {}
        for name in [n[:-len(".in_sum2")] for n in tensors if n.endswith(".in_sum2")]:
            sums, counts = tensors[name + ".in_sum2"], tensors.get(name + ".counts")
            if counts is None or len(name) > MAX_NAME:
                raise ValueError(f"{name}.in_sum2 has no .counts")
            s = np.asarray(sums.data, np.float32).reshape(-1)
            c = np.asarray(counts.data, np.float32).reshape(-1)
            if not c.size or s.size % c.size:
                raise ValueError(f"{name}: {s.size} sums for {c.size} counts")
            ne0 = s.size // c.size
            values = np.ones(s.size, np.float32)
            for j, count in enumerate(c):
                if count > 0:
                    values[j * ne0:(j + 1) * ne0] = s[j * ne0:(j + 1) * ne0] / np.float32(count)
            entries[name] = values
        leftover = [n for n in tensors if not n.endswith((".in_sum2", ".counts"))]
        if leftover:
            raise ValueError(f"unexpected tensor {leftover[0][:60]!r}")
        datasets = fields.get("imatrix.datasets") or []
        chunks = fields.get("imatrix.chunk_count", 0)
        if not (isinstance(datasets, list) and all(isinstance(d, str) for d in datasets) and type(chunks) is int):
            raise ValueError("imatrix.datasets / imatrix.chunk_count of the wrong type")
        return entries, datasets, chunks


def _legacy(data: bytes, given: str) -> tuple[dict, list, int]:
    """int32 entries; per entry: int32 name length, name, int32 calls, int32 values, float32 values;
    then, optionally, int32 chunks, int32 length and the dataset name."""
    at = 0

    def i32() -> int:
        nonlocal at
        (v,) = struct.unpack_from("<i", data, at)
        at += 4
        return v

    def take(n: int, what: str) -> bytes:
        nonlocal at
        if not 0 <= n <= len(data) - at:
            raise ValueError(f"{what} of {n} bytes runs past the end of the file")
        at += n
        return data[at - n:at]

    n_entries = i32()
    if not 0 < n_entries <= len(data) // 12:
        raise ValueError(f"{n_entries} entries cannot fit in {len(data)} bytes")
    entries = {}
    for _ in range(n_entries):
        length = i32()
        if not 0 < length <= MAX_NAME:
            raise ValueError(f"a name of {length} bytes")
        name = take(length, "a name").decode("utf-8")
        calls, n_values = i32(), i32()
        if n_values <= 0 or calls < 0:
            raise ValueError(f"entry {name!r}: {n_values} values, {calls} calls")
        values = np.frombuffer(take(4 * n_values, f"entry {name!r}"), "<f4").astype(np.float32)
        entries[name] = values / np.float32(calls) if calls > 0 else values.copy()
    chunks, datasets = 0, []
    if len(data) - at >= 8:
        chunks = i32()
        datasets = [take(i32(), "the dataset name").decode("utf-8")]
    if at != len(data):
        raise ValueError(f"{len(data) - at} bytes left over at the end")
    return entries, datasets, chunks
