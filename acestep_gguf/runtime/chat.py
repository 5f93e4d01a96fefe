"""VisionChat: multi-turn image chat over llama.cpp's mtmd, keeping the KV cache between turns.

Each turn re-renders the whole conversation with the GGUF's own template, tokenizes it with mtmd,
and compares the result with what the KV cache already holds (text tokens and image ids). Only
what differs is evaluated: earlier images are not encoded again, earlier turns not re-read.

Lifecycle, for host applications that embed it:
- One lock guards the session. ``stream()`` takes it when called (a second generation, or a
  ``reset()`` / ``encode_image()`` meanwhile, raises BusyError at once) and the returned iterator
  releases it when it ends, is closed, or is dropped.
- ``cancel()`` may be called from any thread at any moment after ``stream()``: before the first
  ``next()``, during prefill, image encoding or decoding. The turn ends with
  ``last_turn.finish_reason == "cancelled"`` (a call that returns a value raises CancelledError).
- ``close()`` from another thread during a generation cancels it, waits for it to stop, then
  frees the llama.cpp contexts; every later call raises ModelFilesError. Contexts are also freed
  when ``load()`` fails half-way and, as a last resort, when the object is garbage-collected.
- Ctrl-C in the main thread never lands inside a llama.cpp callback: during a call it cancels
  the call, and KeyboardInterrupt is raised when the call has stopped (see interrupts.py)."""

from __future__ import annotations

import codecs
import ctypes
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np

from .. import interrupts, llama_log
from ..errors import BusyError, CancelledError, ContextFullError, ModelFilesError, OptionError
from ..models.fields import MAX_POSITIONS
from ..system import default_threads
from ..templates import MEDIA_MARKER, PROBES, TemplateFailed, compile_template, probe, render
from .generation import SamplingOptions, TurnStats, release
from .images import PreparedImage, prepare
from .model_files import ModelFiles, check_pair, pixel_recipe, read_fields, resolve
from .offload import N_UBATCH, plan_offload

PATCHED_BUILD = "+acestep.1"
PROMPT_ROOM = 32  # positions beyond one image that the smallest useful context must hold


@dataclass
class _Cached:
    """One span of the KV cache: a text token or a whole image."""

    key: tuple  # ("t", token) or ("i", digest)
    n_pos: int


class _Cancelled(Exception):
    """Raised inside a call when cancel() interrupts llama.cpp; never leaves VisionChat."""


class _Contexts:
    """The llama.cpp objects of one session; freed once, by close(), a failed load or the finalizer."""

    def __init__(self):
        self.llm = None
        self.mctx = None

    def free(self) -> None:
        mctx, self.mctx = self.mctx, None
        llm, self.llm = self.llm, None
        if mctx:
            mtmd.mtmd_free(mctx)
        if llm is not None:
            llm.close()


class VisionChat:
    """A conversation about images with one loaded model. One generation at a time."""

    def __init__(self, files: ModelFiles, contexts: _Contexts, recipe, system: str | None, seed: int | None,
                 n_gpu_layers: int, verbose: bool = False):
        self.files, self.model_path, self.quant = files, files.model, files.quant
        self.n_gpu_layers = n_gpu_layers
        self.offload_plan = None
        # Stock llama.cpp mis-orders llava's [CLS] token (ggml-org/llama.cpp#25814); tools/build_llama_cpp.sh fixes it.
        self.exact_vision = llama_cpp.__version__.endswith(PATCHED_BUILD)
        self._contexts = contexts
        self._finalizer = weakref.finalize(self, contexts.free)
        self._llm, self._mctx, self._recipe = contexts.llm, contexts.mctx, recipe
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self._template = compile_template(self._llm.metadata["tokenizer.chat_template"])
        self._system, self._seed = system, seed
        self._messages: list[dict] = []
        self._cache: list[_Cached] = []
        self._n_past = 0
        self._piece_buf = ctypes.create_string_buffer(256)
        self._lock = threading.Lock()  # the session: held by a turn from stream() to its end, or by one call
        self._active = None  # weakref to the running _Turn: a dropped stream must still be collected
        self._closed = False
        cancel = self._cancel = threading.Event()
        self._abort_cb = llama_cpp.ggml_abort_callback(lambda _: cancel.is_set())  # no reference to self
        llama_cpp.llama_set_abort_callback(self._llm.ctx, self._abort_cb, None)
        self.last_turn = TurnStats()
        self.images_encoded_total = 0
        self._clear()

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path | None = None, *, model: str | Path | None = None, mmproj: str | Path | None = None,
             quant: str | None = None, mmproj_quant: str | None = None, n_ctx: int = 8192, n_threads: int | None = None,
             n_gpu_layers: int | str = "auto", vram: str | int | None = None, system: str | None = None,
             seed: int | None = None, verbose: bool = False) -> "VisionChat":
        """Open a converted folder (or explicit model/mmproj paths) ready to chat. Both files are
        checked against what llama.cpp will read before llama.cpp sees them."""
        files = resolve(folder, model=model, mmproj=mmproj, quant=quant, mmproj_quant=mmproj_quant)
        model_fields = read_fields(files.model, "language model")
        mmproj_fields = read_fields(files.mmproj, "mmproj")
        check_pair(model_fields, mmproj_fields, files)
        recipe = pixel_recipe(mmproj_fields, files.mmproj)
        _check_template(model_fields["tokenizer.chat_template"], files.model, system)
        n_ctx = _checked_ctx(n_ctx, recipe)
        if n_threads is not None and (type(n_threads) is not int or not 1 <= n_threads <= 1024):
            raise OptionError(f"n_threads {n_threads!r}: a whole number from 1 to 1024")
        offload = None
        if n_gpu_layers == "auto":
            offload = plan_offload(files.model, files.mmproj, vram=vram, n_ctx=n_ctx)
            n_gpu_layers = offload.n_gpu_layers
        elif type(n_gpu_layers) is not int or n_gpu_layers < 0:
            raise OptionError(f"n_gpu_layers {n_gpu_layers!r}: 'auto' or a whole number of at least 0")
        contexts = _Contexts()
        try:
            with interrupts.deferred():  # a Ctrl-C while loading is raised once loading has returned
                contexts.llm, contexts.mctx = _open_contexts(files, n_ctx, n_threads, n_gpu_layers, verbose)
                chat = cls(files, contexts, recipe, system, seed, n_gpu_layers, verbose)
        except BaseException:
            contexts.free()
            raise
        chat.offload_plan = offload  # why n_gpu_layers is what it is, when it was planned
        return chat

    def close(self) -> None:
        """Cancel a running generation, wait for it to stop, and free llama.cpp's memory."""
        if self._closed:
            return
        self._cancel.set()
        turn = self._active() if self._active is not None else None
        if turn is not None:
            turn.close()  # waits for a step in progress (cancelled, so short), then ends the turn
        with self._lock:
            self._closed = True
            self._finalizer()
            self._llm = self._mctx = None

    def __enter__(self) -> "VisionChat":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- conversation ----------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        self._require_open()
        return self._llm.n_ctx()

    @property
    def messages(self) -> list[dict]:
        """The conversation so far, images shown by their source label."""
        return [{"role": m["role"], "content": [p if p["type"] == "text" else {"type": "image", "image": p["image"].label}
                                                for p in m["content"]]} for m in self._messages]

    def reset(self) -> None:
        """Start a new conversation (the same system prompt); the KV cache is cleared."""
        with self._session():
            self._clear()

    def cancel(self) -> None:
        """End the running (or just requested) generation soon, from any thread; the partial reply is kept."""
        self._cancel.set()

    def ask(self, prompt: str, images: Sequence | None = (), **sampling) -> str:
        """The whole reply to one user message."""
        return "".join(self.stream(prompt, images, **sampling))

    def stream(self, prompt: str, images: Sequence | None = (), **sampling) -> Iterator[str]:
        """Yield the reply piece by piece. Images come before the prompt text, in the given order.
        The session is busy from this call until the iterator ends or is closed."""
        if not isinstance(prompt, str):
            raise OptionError(f"prompt must be a string, not {type(prompt).__name__}")
        options = SamplingOptions.from_kwargs(self._seed, **sampling)
        prepared = [prepare(img, self._recipe) for img in _image_list(images)]
        parts = [{"type": "image", "image": p} for p in prepared] + [{"type": "text", "text": prompt}]
        self._acquire()
        self._cancel.clear()  # a cancel() from now on, even before the first next(), ends this turn
        self.last_turn = TurnStats()
        turn = _Turn(self, self._turn({"role": "user", "content": parts}, options, self.last_turn))
        self._active = weakref.ref(turn)
        return turn

    def prepare_image(self, image) -> PreparedImage:
        """Decode and check an image now (ImageError if it is refused); the result can be passed to
        ask()/stream() later without decoding it again."""
        return prepare(image, self._recipe)

    def next_token_logprobs(self, prompt: str, images: Sequence | None = ()) -> np.ndarray:
        """Log-probabilities of the first reply token (float64, one per vocabulary entry); the
        conversation does not advance. For parity checks and quality reports."""
        parts = [{"type": "image", "image": prepare(img, self._recipe)} for img in _image_list(images)]
        message = {"role": "user", "content": parts + [{"type": "text", "text": prompt}]}
        with self._session(), interrupts.deferred(self.cancel), self._cancellable():
            self.last_turn = TurnStats()
            self._prefill(self._messages + [message], self.last_turn)
            n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._llm.ctx, -1), shape=(n_vocab,))
            shifted = logits.astype(np.float64) - logits.max()
            return shifted - np.log(np.exp(shifted).sum())

    def encode_image(self, image) -> np.ndarray:
        """The image's projected tokens as the language model receives them (n_tokens x n_embd,
        float32); the conversation is untouched. For parity checks and embedding uses."""
        prepared = prepare(image, self._recipe)
        with self._session(), interrupts.deferred(self.cancel), self._cancellable():
            chunks = self._tokenize(MEDIA_MARKER, [prepared], add_special=False)
            try:
                for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                    chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                    if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                        if mtmd.mtmd_encode_chunk(self._mctx, chunk) != 0:
                            raise ModelFilesError(f"llama.cpp failed to encode the image ({llama_log.recent()})")
                        if self._cancel.is_set():
                            raise _Cancelled()
                        n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                        width = llama_cpp.llama_model_n_embd(self._llm.model)
                        embd = ctypes.cast(mtmd.mtmd_get_output_embd(self._mctx), ctypes.POINTER(ctypes.c_float))
                        return np.ctypeslib.as_array(embd, shape=(n * width,)).reshape(n, width).copy()
            finally:
                mtmd.mtmd_input_chunks_free(chunks)
        raise ModelFilesError("mtmd produced no image chunk for the image")

    # -- the session lock ------------------------------------------------------------------------
    def _require_open(self) -> None:
        if self._closed:
            raise ModelFilesError("this VisionChat is closed; load the model again")

    def _acquire(self) -> None:
        self._require_open()
        if not self._lock.acquire(blocking=False):
            raise BusyError("this VisionChat is already generating; wait for it or cancel() it")
        if self._closed:  # closed while we waited for nothing: give the lock back
            self._lock.release()
            self._require_open()

    def _release(self, turn: "_Turn | None" = None) -> None:
        if turn is not None and self._active is not None and self._active() in (turn, None):
            self._active = None
        self._lock.release()

    @contextmanager
    def _session(self):
        self._acquire()
        try:
            self._cancel.clear()
            yield
        finally:
            self._release()

    @contextmanager
    def _cancellable(self):
        try:
            yield
        except _Cancelled:
            raise CancelledError("cancelled") from None

    def _clear(self) -> None:
        self._messages = []
        if self._system:
            self._messages.append({"role": "system", "content": [{"type": "text", "text": self._system}]})
        self._cache = []
        self._n_past = 0  # positions held by the KV cache: the sum of self._cache's n_pos
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._llm.ctx), True)

    # -- one turn --------------------------------------------------------------------------------
    def _turn(self, message: dict, options: SamplingOptions, stats: TurnStats) -> Iterator[str]:
        """The body of a streamed turn (run by _Turn, which holds the session lock)."""
        with interrupts.deferred(self.cancel):
            started = time.perf_counter()
            try:
                self._prefill(self._messages + [message], stats)
            except _Cancelled:
                stats.finish_reason = "cancelled"  # the message is not added: the conversation is unchanged
                return
            self._messages.append(message)
            reply = {"role": "assistant", "content": [{"type": "text", "text": ""}]}
            self._messages.append(reply)
            for piece in self._generate(options, stats, started, reply):
                reply["content"][0]["text"] += piece
                yield piece

    def _render(self, messages: list[dict], splice: bool = True) -> list:
        """The prompt as pieces: ("text", str, images) or ("tokens", ids). Earlier replies are spliced
        back as the very tokens that were generated, so their KV entries are reused as they are."""
        images, replies, rendered = [], [], []
        for m in messages:
            content = []
            for part in m["content"]:
                if part["type"] == "image":
                    images.append(part["image"])
                    content.append({"type": "text", "text": MEDIA_MARKER})
                else:
                    content.append(part)
            if splice and m["role"] == "assistant" and m.get("tokens") is not None:
                mark = f"\x00reply{len(replies)}\x00"
                replies.append((mark, m["tokens"]))
                content = [{"type": "text", "text": mark}]
            rendered.append({"role": m["role"], "content": content})
        try:
            text = render(self._template, messages=rendered, add_generation_prompt=True,
                          bos_token=self._special_text(llama_cpp.llama_vocab_bos(self._vocab)),
                          eos_token=self._special_text(llama_cpp.llama_vocab_eos(self._vocab)))
        except TemplateFailed as e:
            raise ModelFilesError(f"{self.model_path.name}: the chat template failed on this conversation ({e})") from None
        pieces, rest, queue = [], text, list(images)
        for mark, tokens in replies:
            before, found, rest = rest.partition(mark)
            if not found:  # the template rewrote replies: fall back to plain re-tokenisation
                return self._render(messages, splice=False)
            pieces += [self._text_piece(before, queue), ("tokens", tokens)]
        return pieces + [self._text_piece(rest, queue)]

    @staticmethod
    def _text_piece(text: str, queue: list) -> tuple:
        n = text.count(MEDIA_MARKER)
        taken, queue[:n] = queue[:n], []
        return ("text", text, taken)

    def _prefill(self, messages: list[dict], stats: TurnStats) -> None:
        chunk_lists = []
        try:
            wanted: list[_Cached] = []
            sources: list = []  # per span: None (a text token) or the mtmd image chunk to evaluate
            for piece in self._render(messages):
                if piece[0] == "tokens":
                    wanted += [_Cached(("t", t), 1) for t in piece[1]]
                    sources += [None] * len(piece[1])
                elif piece[1]:
                    chunks = self._tokenize(piece[1], piece[2], add_special=not chunk_lists)
                    chunk_lists.append(chunks)
                    self._spans(chunks, piece[2], wanted, sources)
            if not wanted:
                raise ModelFilesError(f"{self.model_path.name}: the chat template rendered an empty prompt")
            need = sum(s.n_pos for s in wanted)
            n_images = sum(1 for s in wanted if s.key[0] == "i")
            if need + 1 > self.n_ctx:
                raise ContextFullError(
                    f"the conversation needs {need} positions but the context holds {self.n_ctx} "
                    f"({n_images} image(s)); call reset() or load with a larger n_ctx")
            keep = self._common_prefix(wanted)
            self._truncate(keep)
            stats.reused_positions, stats.prompt_positions = self._n_past, need
            if self._cancel.is_set():
                raise _Cancelled()
            self._eval(wanted[keep:], sources[keep:], stats)
        finally:
            for chunks in chunk_lists:
                mtmd.mtmd_input_chunks_free(chunks)

    def _tokenize(self, text: str, images: list[PreparedImage], add_special: bool):
        bitmaps = [mtmd.mtmd_bitmap_init(img.size, img.size, (ctypes.c_uint8 * len(img.rgb)).from_buffer_copy(img.rgb))
                   for img in images]
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            for bitmap, img in zip(bitmaps, images):
                mtmd.mtmd_bitmap_set_id(bitmap, img.digest.encode())
            data = text.encode("utf-8")
            inp = mtmd.mtmd_input_text(text=data, text_len=len(data), add_special=add_special, parse_special=True)
            array = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            status = mtmd.mtmd_tokenize(self._mctx, chunks, ctypes.byref(inp), array, len(bitmaps))
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)
        if status != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            raise ModelFilesError(f"mtmd could not tokenize the prompt (status {status}: the chat template placed "
                                  f"{text.count(MEDIA_MARKER)} image markers for {len(images)} images)")
        return chunks

    @staticmethod
    def _spans(chunks, images, wanted: list, sources: list) -> None:
        image_iter = iter(images)
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                wanted += [_Cached(("t", tokens[j]), 1) for j in range(n.value)]
                sources += [None] * n.value
            else:
                wanted.append(_Cached(("i", next(image_iter).digest), mtmd.mtmd_input_chunk_get_n_pos(chunk)))
                sources.append(chunk)

    def _common_prefix(self, wanted: list[_Cached]) -> int:
        n = 0
        for have, want in zip(self._cache, wanted):
            if have.key != want.key:
                break
            n += 1
        return min(n, len(wanted) - 1)  # evaluate at least the last token to get fresh logits

    def _eval(self, spans: list[_Cached], sources: list, stats: TurnStats) -> None:
        """Evaluate text tokens in batches and images through mtmd's encoder, in prompt order."""
        pending: list[_Cached] = []
        for span, chunk in zip(spans, sources):
            if chunk is None:
                pending.append(span)
                continue
            self._decode_text(pending, stats)
            pending = []
            self._decode_image(chunk, span, stats)
        self._decode_text(pending, stats)

    def _truncate(self, keep: int) -> None:
        self._n_past = sum(s.n_pos for s in self._cache[:keep])
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._llm.ctx), 0, self._n_past, -1)
        del self._cache[keep:]

    def _decode_text(self, spans: list[_Cached], stats: TurnStats) -> None:
        batch = self._llm.n_batch
        for start in range(0, len(spans), batch):
            part = spans[start:start + batch]
            tokens = (llama_cpp.llama_token * len(part))(*[s.key[1] for s in part])
            self._check_decode(llama_cpp.llama_decode(self._llm.ctx, llama_cpp.llama_batch_get_one(tokens, len(part))))
            self._cache += part
            self._n_past += len(part)
            stats.evaluated_positions += len(part)

    def _decode_image(self, chunk, span: _Cached, stats: TurnStats) -> None:
        if self._cancel.is_set():
            raise _Cancelled()
        new_n_past = llama_cpp.llama_pos(0)
        status = mtmd.mtmd_helper_eval_chunk_single(self._mctx, self._llm.ctx, chunk, self._n_past, 0,
                                                    self._llm.n_batch, False, ctypes.byref(new_n_past))
        if self._cancel.is_set():
            self._truncate(len(self._cache))
            raise _Cancelled()
        if status != 0:
            self._truncate(len(self._cache))
            raise ModelFilesError(f"llama.cpp failed to encode an image (status {status}: {llama_log.recent()})")
        self._cache.append(span)
        self._n_past += span.n_pos
        stats.evaluated_positions += span.n_pos
        stats.images_encoded += 1
        self.images_encoded_total += 1

    def _check_decode(self, status: int) -> None:
        if status == 0:
            return
        self._truncate(len(self._cache))  # drop whatever part of the batch did land
        if status == 2 or self._cancel.is_set():
            raise _Cancelled()
        if status == 1:
            raise ContextFullError(f"no room left in the {self.n_ctx}-token context; call reset() or use a larger n_ctx")
        raise ModelFilesError(f"llama_decode failed with status {status} ({llama_log.recent()})")

    # -- generation --------------------------------------------------------------------------------
    def _sampler(self, o: SamplingOptions):
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if o.temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(o.top_p, 1))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(o.temperature))
            seed = llama_cpp.LLAMA_DEFAULT_SEED if o.seed is None else o.seed
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _piece(self, token: int, special: bool = False) -> bytes:
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buf, 256, 0, special)
        return self._piece_buf.raw[:max(n, 0)]

    def _special_text(self, token: int) -> str:
        """A control token's own text (<|im_end|>), as templates expect for eos_token / bos_token."""
        return self._piece(token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    def _generate(self, o: SamplingOptions, stats: TurnStats, started: float, reply: dict) -> Iterator[str]:
        sampler = self._sampler(o)
        decoder = codecs.getincrementaldecoder("utf-8")("ignore")  # as llama-cpp-python does
        text, sent, stop_hit = "", 0, False
        t_first = None
        generated: list[int] = []
        stats_sink = TurnStats()  # generated tokens are not prompt evaluation
        reply["tokens"] = generated  # spliced into the next turn's prompt: its KV entries are reused
        try:
            while True:
                if self._cancel.is_set():
                    stats.finish_reason = "cancelled"
                    break
                if stats.completion_tokens >= o.max_tokens:
                    stats.finish_reason = "length"
                    break
                token = llama_cpp.llama_sampler_sample(sampler, self._llm.ctx, -1)
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.time_to_first_token_s = t_first - started
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    stats.finish_reason = "stop"
                    break
                stats.completion_tokens += 1
                generated.append(token)
                text += decoder.decode(self._piece(token))
                out, stop_hit = release(text, sent, o.stop)
                if out:
                    sent += len(out)
                    yield out
                if stop_hit:  # the kept text no longer matches the tokens: re-tokenise it next turn
                    stats.finish_reason = "stop"
                    reply["tokens"] = None
                    break
                if self._n_past + 1 >= self.n_ctx:
                    stats.finish_reason = "context"
                    break
                try:
                    self._decode_text([_Cached(("t", token), 1)], stats_sink)
                except _Cancelled:
                    stats.finish_reason = "cancelled"
                    break
            text += decoder.decode(b"", final=True)
            if not stop_hit and text[sent:]:
                yield text[sent:]  # a held-back partial stop string that never completed
        except GeneratorExit:
            stats.finish_reason = stats.finish_reason or "cancelled"  # closed by the caller before the end
            raise
        except Exception:
            stats.finish_reason = "error"
            raise
        finally:
            llama_cpp.llama_sampler_free(sampler)
            if t_first is not None:
                stats.decode_s = time.perf_counter() - t_first


class _Turn:
    """The iterator ``stream()`` returns. It holds the session lock from creation to its end, so a
    cancel() right after stream() is honoured, and close() from any thread can end it safely."""

    def __init__(self, chat: VisionChat, body: Iterator[str]):
        self._chat, self._body = chat, body
        self._step = threading.Lock()  # held while a piece is being produced
        self._done = False

    def __iter__(self) -> "_Turn":
        return self

    def __next__(self) -> str:
        with self._step:
            if self._done:
                raise StopIteration
            try:
                return next(self._body)
            except BaseException:
                self._finish()
                raise

    def close(self) -> None:
        with self._step:
            if not self._done:
                try:
                    self._body.close()
                finally:
                    if not self._chat.last_turn.finish_reason:
                        self._chat.last_turn.finish_reason = "cancelled"
                    self._finish()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._chat._release(self)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _image_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (str, bytes, Path)) or not hasattr(images, "__iter__"):
        return [images]  # one image given on its own
    return list(images)


def _checked_ctx(n_ctx, recipe) -> int:
    """A context that holds at least one image and a short prompt, and no more than any model uses."""
    n_image = (recipe.image_size // recipe.patch_size) ** 2
    least = n_image + PROMPT_ROOM
    if type(n_ctx) is not int or not least <= n_ctx <= MAX_POSITIONS:
        raise OptionError(f"n_ctx {n_ctx!r}: one image takes {n_image} positions, so the context must be a whole "
                          f"number from {least} to {MAX_POSITIONS}")
    return n_ctx


def _check_template(template: str, path: Path, system: str | None) -> None:
    """The conversations this session will send render with the file's template (a system message
    only when one is given): a template that cannot is refused now, not mid-conversation."""
    try:
        compiled = compile_template(template)
        for which in PROBES:
            if which != "a system message" or system:
                probe(compiled, which)
    except TemplateFailed as e:
        hint = "; leave out the system prompt" if system and "system" in str(e).lower() else ""
        raise ModelFilesError(f"{path}: the chat template cannot render a conversation ({e}){hint}") from None


def _open_contexts(files: ModelFiles, n_ctx: int, n_threads: int | None, n_gpu_layers: int, verbose: bool):
    llama_log.install(verbose)
    try:
        llm = llama_cpp.Llama(str(files.model), n_ctx=n_ctx, n_threads=n_threads or default_threads(),
                              n_gpu_layers=n_gpu_layers, n_batch=min(n_ctx, 2048),
                              n_ubatch=min(n_ctx, N_UBATCH), verbose=verbose)
    except ValueError as e:
        raise ModelFilesError(f"{files.model}: llama.cpp could not load it ({llama_log.recent() or e})") from None
    llama_log.install(verbose)  # Llama() installs its own logger; take it back
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = n_gpu_layers > 0
    params.print_timings = verbose
    params.n_threads = llm.n_threads
    mctx = mtmd.mtmd_init_from_file(str(files.mmproj).encode(), llm.model, params)
    if not mctx:
        llm.close()
        raise ModelFilesError(f"{files.mmproj}: llama.cpp could not load the mmproj ({llama_log.recent()})")
    return llm, mctx
