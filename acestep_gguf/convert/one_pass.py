"""One pass from safetensors to every requested GGUF: each tensor is read once, in whole-row slabs,
and written to each output in the type llama.cpp's quantizer would give it (tensor_types.py), by
ggml's own kernels (ggml_kernels.py). No lossless intermediate touches the disk.

The files are laid out as `llama_model_quantize` lays out its output from our lossless GGUF: the
same metadata in the same order with `general.quantization_version` and `general.file_type` moved
to the end (its gguf_set_val_* removes a key and appends it), the tensors in its weights_map order,
32-byte alignment. The tests hold the two byte for byte equal."""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUFWriter, Keys
from gguf import GGMLQuantizationType as Q
from gguf.gguf_writer import WriterState

from ..models.spec import MetadataEntry
from ..quant_types import QuantType, tensor_bytes
from .ggml_kernels import Quantizer
from .gguf_stream import OutTensor, Scratch, source_rows, to_type
from .imatrix import Imatrix
from .safetensors_file import TensorReader
from .tensor_types import TensorInfo, choose_types, quantizer_order

MOVED_TO_END = (Keys.General.QUANTIZATION_VERSION, Keys.General.FILE_TYPE)


class HashingFile:
    """A file that hashes what is written to it: the manifest's sha256 without reading the file again."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return self._named(self._f.write, data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._named(self._f.flush)

    def close(self) -> None:
        self._named(self._f.close)

    def _named(self, call, *args):
        """A buffered write fails in write, flush or close: name the file (which output did not fit)."""
        try:
            return call(*args)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None


@dataclass
class Written:
    """One finished output: where, what, and its digest."""

    quant: QuantType
    path: Path
    size: int
    sha256: str


class _BackgroundWrites:
    """Hashing and writing in a thread of their own (both release the GIL), in order, while the
    next slab is read and quantized; at most a few slabs wait, so memory stays bounded."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gguf-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    item[0].write(item[1])
                except BaseException as e:  # handed to the main thread at its next put or at finish
                    self._error = e

    def put(self, out: "_Output", data) -> None:
        self._raise()
        self._queue.put((out, data))

    def finish(self) -> None:
        """Wait for every write; raise the first error."""
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


class _Output:
    def __init__(self, quant: QuantType, path: Path, arch: str, metadata: Sequence[MetadataEntry],
                 tensors: Sequence[OutTensor], types: Sequence[Q], extra: Sequence[MetadataEntry] = ()):
        self.quant, self.path = quant, path
        self.types = {t.gguf_name: q for t, q in zip(tensors, types)}
        self.file = HashingFile(path)
        self.writer = GGUFWriter(None, arch)
        for e in metadata:
            if e.key not in MOVED_TO_END:
                self.writer.add_key_value(e.key, e.value, e.value_type, e.sub_type)
        self.writer.add_uint32(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION)
        self.writer.add_uint32(Keys.General.FILE_TYPE, int(quant.file_type))
        for e in extra:  # llama_model_quantize applies its KV overrides last
            self.writer.add_key_value(e.key, e.value, e.value_type, e.sub_type)
        for t, q in zip(tensors, types):
            # a dummy float dtype: with raw_dtype given, gguf-py takes the shape as elements, not bytes
            self.writer.add_tensor_info(t.gguf_name, t.source.shape, np.dtype(np.float32),
                                        tensor_bytes(q, t.source.n_elements), raw_dtype=q)
        self.writer.fout, self.writer.state = [self.file], WriterState.EMPTY
        self.writer.write_header_to_file()
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()
        self.queued = self.file.size

    def send(self, writes: _BackgroundWrites, data) -> None:
        self.queued += memoryview(data).nbytes
        writes.put(self, data)

    def send_padding(self, writes: _BackgroundWrites) -> None:
        """The zeros that align the next tensor (what is queued counts as written)."""
        pad = -self.queued % self.writer.data_alignment
        if pad:
            self.send(writes, bytes(pad))

    def write(self, data) -> None:
        """In the writer thread, in order."""
        self.file.write(data)

    def close(self, quietly: bool = False) -> None:
        try:
            self.file.close()
        except OSError:
            if not quietly:
                raise


def plan_types(tensors: Sequence[OutTensor], quant: QuantType, n_layer: int, is_70b: bool, n_gqa: int = 1,
               has_imatrix: bool = False) -> list[Q]:
    """Each tensor's type in a ``quant`` file, ``tensors`` in the quantizer's order."""
    infos = [TensorInfo(t.gguf_name, tuple(reversed(t.source.shape)), t.out_type) for t in tensors]
    return choose_types(infos, quant, n_layer, is_70b, n_gqa, has_imatrix)


def write_quantized(targets: Sequence[tuple[QuantType, Path]], arch: str, metadata: Sequence[MetadataEntry],
                    tensors: Sequence[OutTensor], reader: TensorReader, *, n_layer: int, is_70b: bool,
                    threads: int, advance: Callable[[int], None] = lambda n: None, n_gqa: int = 1,
                    imatrix: Imatrix | None = None) -> list[Written]:
    """Write every target from one read of the source. ``tensors`` carry their lossless types (what
    llama.cpp's quantizer would have read); the files are written in order and closed on any error
    (the caller owns and deletes the partial paths). With an ``imatrix``, each weight it has an entry
    for is quantized with that importance (as llama.cpp passes it) and its keys close the metadata."""
    extra = imatrix.metadata() if imatrix is not None else []
    by_name = {t.gguf_name: t for t in tensors}
    ordered = [by_name[n] for n in quantizer_order(list(by_name))]
    outputs: list[_Output] = []
    writes = _BackgroundWrites()
    scratch = Scratch()
    try:
        for quant, path in targets:
            outputs.append(_Output(quant, path, arch, list(metadata), ordered,
                                   plan_types(ordered, quant, n_layer, is_70b, n_gqa, imatrix is not None), extra))
        with Quantizer(threads) as quantizer:
            for t in ordered:
                for out in outputs:
                    out.send_padding(writes)
                n_per_row = t.source.shape[-1] if t.source.shape else 1
                for chunk in source_rows(t, reader, advance):
                    rows = None
                    for out in outputs:
                        q = out.types[t.gguf_name]
                        if q == t.out_type:  # llama.cpp copies a tensor already in its target type
                            # a copy: the source chunk's buffer is reused by the next read
                            out.send(writes, to_type(chunk, t.source.dtype, t.out_type).tobytes())
                            continue
                        if rows is None:  # what llama.cpp dequantizes the lossless tensor to: exact
                            rows = to_type(chunk, t.source.dtype, Q.F32, scratch.at_least(chunk.size))
                            rows = rows.reshape(-1, n_per_row)
                        what = f"{t.source.file.name}: tensor {t.source.name!r} ({t.gguf_name})"
                        weights = imatrix.entries.get(t.gguf_name) if imatrix is not None else None
                        out.send(writes, quantizer.rows(q, rows, what, weights))
                for out in outputs:
                    out.send_padding(writes)
        writes.finish()
    except BaseException:
        try:
            writes.finish()
        except BaseException:
            pass  # the first error is the one to report
        for out in outputs:
            out.close(quietly=True)
        raise
    for out in outputs:
        out.close()
    return [Written(o.quant, o.path, o.file.size, o.file.sha256.hexdigest()) for o in outputs]

