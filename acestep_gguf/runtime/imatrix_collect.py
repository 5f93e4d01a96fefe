"""Importance matrices computed through the runtime (`acestep-gguf imatrix`), calibrated on pictures as
well as text: in a vision-language prompt most positions are image tokens, which `llama-imatrix`
(text only) never sees.

What is collected is what llama.cpp's tools/imatrix/imatrix.cpp collects: through the context's eval
callback, for every MUL_MAT whose weight is a `blk.*` tensor and whose activations (src1) are F32 with
at least 16 rows, the per-column sum of squared activations and the number of rows. Text is cut into
chunks of `chunk_size` tokens as llama-imatrix cuts it (BOS in place of each chunk's first token where
the vocabulary adds one); conversations (a picture, a question, an answer) are rendered with the
model's own chat template and evaluated by mtmd into the same context. The callback never raises (a
failure is kept and reported after llama.cpp returns) and stops the computation on cancel."""

from __future__ import annotations

import ctypes
import pathlib
import threading
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from ..errors import CancelledError, ModelFilesError

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
MIN_ROWS = 16  # llama-imatrix skips smaller batches
F32 = 0


class GgmlTensor(ctypes.Structure):  # struct ggml_tensor, ggml.h of the pinned llama.cpp
    pass


GgmlTensor._fields_ = [
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS), ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)), ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * GGML_MAX_SRC), ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def _ggml():
    lib = ctypes.CDLL(str(next((pathlib.Path(llama_cpp.__file__).resolve().parent / "lib").glob("libggml-base.so*"))))
    lib.ggml_op_name.restype, lib.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    lib.ggml_backend_buffer_is_host.restype, lib.ggml_backend_buffer_is_host.argtypes = ctypes.c_bool, [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_nbytes.restype, lib.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    return lib


def weight_name(raw: bytes) -> str:
    """filter_tensor_name: a scheduler copy is named 'BACKEND#name#n'."""
    name = raw.decode("utf-8", "replace")
    if "#" in name:
        name = name.split("#", 2)[1]
    return name


@dataclass
class Collector:
    """Sums of squared activations per weight, and rows seen, as llama-imatrix keeps them."""

    sums: dict = field(default_factory=dict)  # name -> float64 per column
    counts: dict = field(default_factory=dict)  # name -> rows
    error: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self._lib = _ggml()
        self._mul_mat = next(i for i in range(512) if (self._lib.ggml_op_name(i) or b"") == b"MUL_MAT")
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def _on_node(self, tensor_p, ask, user_data) -> bool:
        try:
            if self.cancel.is_set():
                return False  # in the data phase this stops the computation
            t = ctypes.cast(tensor_p, ctypes.POINTER(GgmlTensor)).contents
            if t.op != self._mul_mat or not t.src[0] or not t.src[1]:
                return False if ask else True
            w, x = t.src[0].contents, t.src[1].contents
            name = weight_name(w.name)
            if ask:
                return x.ne[1] >= MIN_ROWS and x.type == F32 and name.startswith("blk.")
            self._add(name, w, x, t.src[1])
            return True
        except BaseException as e:  # never into llama.cpp's stack
            self.error = self.error or f"{type(e).__name__}: {e}"
            self.cancel.set()
            return False

    def _add(self, name: str, w: GgmlTensor, x: GgmlTensor, x_p) -> None:
        ne0, rows, n2, n3 = x.ne[0], x.ne[1], x.ne[2], x.ne[3]
        n_mat = w.ne[2] * w.ne[3]
        if self._lib.ggml_backend_buffer_is_host(x.buffer):
            base = x.data
        else:
            buf = (ctypes.c_char * self._lib.ggml_nbytes(x_p))()
            self._lib.ggml_backend_tensor_get(x_p, buf, 0, ctypes.sizeof(buf))
            base = ctypes.addressof(buf)
        acc = self.sums.setdefault(name, np.zeros(ne0 * n_mat))
        for i3 in range(n3):
            for i2 in range(n2):
                mat = (i3 % w.ne[3]) * w.ne[2] + (i2 % w.ne[2])
                start = base + i2 * x.nb[2] + i3 * x.nb[3]
                view = np.ctypeslib.as_array(ctypes.cast(start, ctypes.POINTER(ctypes.c_float)),
                                             shape=(rows * x.nb[1] // 4,))
                block = np.lib.stride_tricks.as_strided(view, shape=(rows, ne0), strides=(x.nb[1], 4))
                acc[mat * ne0:(mat + 1) * ne0] += np.einsum("ij,ij->j", block, block, dtype=np.float64)
        self.counts[name] = self.counts.get(name, 0) + rows * n2 * n3 // n_mat

    def raise_if_failed(self) -> None:
        if self.error:
            raise ModelFilesError(f"collecting the importance matrix failed ({self.error})")


class CalibrationContext:
    """A second llama.cpp context on a loaded VisionChat's model, with the collector as its eval
    callback; the chat's own KV session drives it (its tokenizer, template, mtmd)."""

    def __init__(self, chat, n_ctx: int, collector: Collector):
        self.chat, self.collector = chat, collector
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_ctx, min(n_ctx, 512)
        params.n_threads = params.n_threads_batch = chat._contexts.llm.n_threads
        params.cb_eval = collector.callback
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(chat._contexts.llm.model, params)
        if not self.ctx:
            raise ModelFilesError("llama.cpp could not create the calibration context")
        self.n_ctx, self.n_batch = n_ctx, n_ctx

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def decode(self, tokens: list[int], start: int = 0) -> None:
        """One batch of tokens from position ``start``, every position's logits asked for as
        llama-imatrix asks them: llama.cpp computes its last layer only for those positions."""
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, start + i, 1, True
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(tokens)
            status = llama_cpp.llama_decode(self.ctx, batch)
        finally:
            llama_cpp.llama_batch_free(batch)
        self._check(status)

    def _check(self, status: int) -> None:
        self.collector.raise_if_failed()
        if self.collector.cancel.is_set():
            raise CancelledError("cancelled")
        if status != 0:
            raise ModelFilesError(f"llama_decode failed during calibration (status {status})")


class _ContextShim:
    """What KVSession needs of a Llama, for the calibration context."""

    def __init__(self, calibration: CalibrationContext):
        self.ctx, self.model, self.n_batch = calibration.ctx, calibration.chat._contexts.llm.model, calibration.n_batch
        self._n_ctx = calibration.n_ctx

    def n_ctx(self) -> int:
        return self._n_ctx


def run_conversation(calibration: CalibrationContext, messages: list[dict]) -> int:
    """Evaluate one whole conversation (pictures, question, answer) from position 0; returns its
    positions. Text is decoded with every position's logits (so the last layer sees it all); pictures
    go through mtmd, which asks for none, so the last layer's attention output and FFN see only the
    text positions — llama.cpp computes nothing else there."""
    from .generation import TurnStats
    from .kv_session import KVSession
    from .prompt import render_prompt

    class CalibrationKV(KVSession):
        def decode_text(self, spans, stats) -> None:
            for first in range(0, len(spans), self.llm.n_batch):
                part = spans[first:first + self.llm.n_batch]
                calibration.decode([s.key[1] for s in part], self.n_past)
                self.cache += part
                self.n_past += len(part)
                stats.evaluated_positions += len(part)

    chat = calibration.chat
    calibration.clear()
    kv = CalibrationKV(_ContextShim(calibration), chat._contexts.mctx, calibration.collector.cancel)
    style = chat.image_style
    pieces = render_prompt(chat._template, style, messages, kv.special_text(llama_cpp.llama_vocab_bos(kv.vocab)),
                           kv.special_text(llama_cpp.llama_vocab_eos(kv.vocab)),
                           lambda text: kv.holds_markup(text) or (style.parts and style.placeholder in text))
    stats = TurnStats()
    try:
        kv.prefill(pieces, stats)
    except Exception:
        calibration.collector.raise_if_failed()
        raise
    calibration._check(0)
    return stats.prompt_positions
