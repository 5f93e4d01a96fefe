"""One pass from safetensors to every requested GGUF: each tensor is read once, in whole-row slabs,
and written to each output in the type llama.cpp's quantizer would give it (tensor_types.py), by
ggml's own kernels (ggml_kernels.py). No lossless intermediate touches the disk.

The files are laid out as `llama_model_quantize` lays out its output from our lossless GGUF: the
same metadata in the same order with `general.quantization_version` and `general.file_type` moved
to the end (its gguf_set_val_* removes a key and appends it), the tensors in its weights_map order,
32-byte alignment. The tests hold the two byte for byte equal."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUFValueType, GGUFWriter, Keys
from gguf import GGMLQuantizationType as Q
from gguf.gguf_writer import WriterState

from ..models.spec import MetadataEntry
from ..quant_types import QuantType, tensor_bytes
from .ggml_kernels import Quantizer
from .gguf_stream import OutTensor, source_rows, to_type
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
        self.size += len(memoryview(data).cast("B"))
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


class _Output:
    def __init__(self, quant: QuantType, path: Path, arch: str, metadata: Sequence[MetadataEntry],
                 tensors: Sequence[OutTensor], types: Sequence[Q]):
        self.quant, self.path = quant, path
        self.types = {t.gguf_name: q for t, q in zip(tensors, types)}
        self.file = HashingFile(path)
        self.writer = GGUFWriter(None, arch)
        for e in metadata:
            if e.key not in MOVED_TO_END:
                self.writer.add_key_value(e.key, e.value, e.value_type, e.sub_type)
        self.writer.add_uint32(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION)
        self.writer.add_uint32(Keys.General.FILE_TYPE, int(quant.file_type))
        for t, q in zip(tensors, types):
            # a dummy float dtype: with raw_dtype given, gguf-py takes the shape as elements, not bytes
            self.writer.add_tensor_info(t.gguf_name, t.source.shape, np.dtype(np.float32),
                                        tensor_bytes(q, t.source.n_elements), raw_dtype=q)
        self.writer.fout, self.writer.state = [self.file], WriterState.EMPTY
        self.writer.write_header_to_file()
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()

    def pad(self) -> None:
        self.writer.write_padding(self.file, self.file.tell())

    def close(self, quietly: bool = False) -> None:
        try:
            self.file.close()
        except OSError:
            if not quietly:
                raise


def plan_types(tensors: Sequence[OutTensor], quant: QuantType, n_layer: int, is_70b: bool) -> list[Q]:
    """Each tensor's type in a ``quant`` file, ``tensors`` in the quantizer's order."""
    infos = [TensorInfo(t.gguf_name, tuple(reversed(t.source.shape)), t.out_type) for t in tensors]
    return choose_types(infos, quant, n_layer, is_70b)


def write_quantized(targets: Sequence[tuple[QuantType, Path]], arch: str, metadata: Sequence[MetadataEntry],
                    tensors: Sequence[OutTensor], reader: TensorReader, *, n_layer: int, is_70b: bool,
                    threads: int, advance: Callable[[int], None] = lambda n: None) -> list[Written]:
    """Write every target from one read of the source. ``tensors`` carry their lossless types (what
    llama.cpp's quantizer would have read); the files are written in order and closed on any error
    (the caller owns and deletes the partial paths)."""
    by_name = {t.gguf_name: t for t in tensors}
    ordered = [by_name[n] for n in quantizer_order(list(by_name))]
    outputs: list[_Output] = []
    try:
        for quant, path in targets:
            outputs.append(_Output(quant, path, arch, metadata, ordered,
                                   plan_types(ordered, quant, n_layer, is_70b)))
        with Quantizer(threads) as quantizer:
            for t in ordered:
                for out in outputs:
                    out.pad()
                n_per_row = t.source.shape[-1] if t.source.shape else 1
                for chunk in source_rows(t, reader, advance):
                    lossless = to_type(chunk, t.source.dtype, t.out_type)
                    rows = None
                    for out in outputs:
                        q = out.types[t.gguf_name]
                        if q == t.out_type:  # llama.cpp copies a tensor already in its target type
                            out.file.write(lossless.data)
                            continue
                        if rows is None:  # what llama.cpp dequantizes the lossless tensor to: exact
                            rows = np.ascontiguousarray(to_type(chunk, t.source.dtype, Q.F32).reshape(-1, n_per_row))
                        out.file.write(quantizer.rows(q, rows, t.gguf_name).data)
                for out in outputs:
                    out.pad()
    except BaseException:
        for out in outputs:
            out.close(quietly=True)  # the first error is the one to report
        raise
    for out in outputs:
        out.close()
    return [Written(o.quant, o.path, o.file.size, o.file.sha256.hexdigest()) for o in outputs]

