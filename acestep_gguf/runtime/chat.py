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
  the call, and KeyboardInterrupt is raised when the call has stopped (see interrupts.py).
- ``batch()`` (a context loaded with ``parallel`` > 1 decodes that many at once, runtime/batch.py)
  holds the session like a turn: from the call until its iterator ends or is closed."""

from __future__ import annotations

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
from ..errors import BusyError, CancelledError, ModelFilesError, OptionError
from ..models.fields import MAX_PARALLEL, MAX_POSITIONS
from ..system import available_memory, default_threads
from ..templates import (KNOWN_PLACEHOLDERS, MEDIA_MARKER, PLACEHOLDER_KEY, ImageStyle, TemplateFailed, compile_template,
                         image_style)
from .generation import SamplingOptions, TurnStats, generate
from .images import MAX_DECODED_BYTES, PreparedImage, prepare
from .batch import BatchCounters, BatchReply, BatchRequest, answer_all
from .kv_cache_types import CacheTypes
from .kv_session import AbortFlag, Cancelled, KVSession, KVSnapshot
from .llama_context import LoadedModel
from ..models.llava_next import NEWLINE_TENSOR
from .gguf_header import read_float_tensor, read_header
from .model_files import ModelFiles, check_pair, fields_of, pixel_recipe, resolve
from .prompt import render_prompt
from .offload import N_UBATCH, auto_parallel, offload_planner

PATCHED_BUILD = "+acestep."  # 0.3.36+acestep.N: tools/build_llama_cpp.sh
PROMPT_ROOM = 32  # positions beyond one image that the smallest useful context must hold


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

    def __init__(self, files: ModelFiles, contexts: _Contexts, recipe, style: ImageStyle, template: str,
                 system: str | None, seed: int | None, n_gpu_layers: int, image_newline: np.ndarray | None = None):
        self.files, self.model_path, self.quant = files, files.model, files.quant
        self.n_gpu_layers = n_gpu_layers
        self.offload_plan = None
        self.cache_types = CacheTypes()
        # Stock llama.cpp mis-orders llava's [CLS] token (ggml-org/llama.cpp#25814); tools/build_llama_cpp.sh fixes it.
        self.exact_vision = PATCHED_BUILD in llama_cpp.__version__
        self._contexts = contexts
        self._finalizer = weakref.finalize(self, contexts.free)
        self._recipe = recipe
        self.chat_template = template  # the GGUF's own
        self._template = compile_template(self.chat_template)
        self.image_style = style  # how the template places pictures (checked at load)
        self._system, self._seed = system, seed
        self._messages: list[dict] = []
        self._lock = threading.Lock()  # the session: held by a turn from stream() to its end, or by one call
        self._active = None  # weakref to the running _Turn: a dropped stream must still be collected
        self._closed = False
        cancel = self._cancel = threading.Event()
        abort = self._abort = AbortFlag(cancel)  # also a batch's sequence being prefilled (runtime/batch.py)
        self._abort_cb = llama_cpp.ggml_abort_callback(abort)  # no reference to self
        llama_cpp.llama_set_abort_callback(contexts.llm.ctx, self._abort_cb, None)
        self._kv = KVSession(contexts.llm, contexts.mctx, cancel, image_newline=image_newline)
        self.parallel = contexts.llm.n_seq  # sequences the context holds (batch(), serve --parallel)
        self.last_batch = BatchCounters()  # of the last batch() call
        self.last_turn = TurnStats()
        self.images_encoded_total = 0
        self._clear()

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path | None = None, *, model: str | Path | None = None, mmproj: str | Path | None = None,
             quant: str | None = None, mmproj_quant: str | None = None, n_ctx: int = 8192, n_threads: int | None = None,
             n_gpu_layers: int | str = "auto", vram: str | int | None = None, system: str | None = None,
             seed: int | None = None, cache_type_k: str = "f16", cache_type_v: str = "f16", parallel: int | str = 1,
             verbose: bool = False) -> "VisionChat":
        """Open a converted folder, a model of the store ("name" or "name:TYPE"), or explicit
        model/mmproj paths, ready to chat. Both files are checked against what llama.cpp will read
        before llama.cpp sees them. ``cache_type_k`` / ``cache_type_v``: f16, q8_0 or q4_0 (a quantized
        V switches flash attention on, as llama.cpp requires). ``parallel``: how many conversations
        the context holds at once, each with ``n_ctx`` positions of its own (batch(), serve --parallel);
        "auto": 4, 2 or 1, the most whose KV caches cost no GPU layer and at most a quarter of free RAM."""
        cache = CacheTypes.parse(cache_type_k, cache_type_v)
        files = resolve(folder, model=model, mmproj=mmproj, quant=quant, mmproj_quant=mmproj_quant)
        headers = read_header(files.model, "language model"), read_header(files.mmproj, "mmproj")  # once per load
        model_fields, mmproj_fields = fields_of(headers[0]), fields_of(headers[1])
        check_pair(model_fields, mmproj_fields, files)
        recipe = pixel_recipe(mmproj_fields, files.mmproj)
        newline = _image_newline(headers[1], files.mmproj) if recipe.pinpoints else None
        style = _image_style(model_fields, files.model, system)
        n_ctx = _checked_ctx(n_ctx, recipe)
        arch = model_fields["general.architecture"]
        cache.check_head_dim(model_fields.get(f"{arch}.attention.key_length", model_fields[f"{arch}.embedding_length"]
                                              // model_fields[f"{arch}.attention.head_count"]))
        if parallel != "auto" and (type(parallel) is not int or not 1 <= parallel <= MAX_PARALLEL):
            raise OptionError(f"parallel {parallel!r}: 'auto' or a whole number of conversations from 1 to "
                              f"{MAX_PARALLEL}")
        if n_threads is not None and (type(n_threads) is not int or not 1 <= n_threads <= 1024):
            raise OptionError(f"n_threads {n_threads!r}: a whole number from 1 to 1024")
        planned = offload_planner(files.model, files.mmproj, vram, headers=headers, cache=cache) \
            if "auto" in (parallel, n_gpu_layers) else None
        if parallel == "auto":
            parallel = auto_parallel(lambda n: planned(n_ctx * n), available_memory())
        offload = None
        if n_gpu_layers == "auto":
            offload = planned(n_ctx * parallel)  # every sequence has a KV cache of its own
            n_gpu_layers = offload.n_gpu_layers
        elif type(n_gpu_layers) is not int or n_gpu_layers < 0:
            raise OptionError(f"n_gpu_layers {n_gpu_layers!r}: 'auto' or a whole number of at least 0")
        contexts = _Contexts()
        try:
            with interrupts.deferred():  # a Ctrl-C while loading is raised once loading has returned
                contexts.llm, contexts.mctx = _open_contexts(files, n_ctx, n_threads, n_gpu_layers, cache, verbose,
                                                             parallel, recipe)
                chat = cls(files, contexts, recipe, style, model_fields["tokenizer.chat_template"], system, seed,
                           n_gpu_layers, newline)
        except BaseException:
            contexts.free()
            raise
        chat.offload_plan = offload  # why n_gpu_layers is what it is, when it was planned
        chat.cache_types = cache
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
            self._kv = None
            self._finalizer()

    def __enter__(self) -> "VisionChat":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- conversation ----------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        self._require_open()
        return self._kv.n_ctx

    @property
    def n_vocab(self) -> int:
        self._require_open()
        return llama_cpp.llama_vocab_n_tokens(self._kv.vocab)

    @property
    def image_size(self) -> int:
        """The side of the square picture (or of each tile) the vision tower takes."""
        return self._recipe.image_size

    @property
    def pixel_recipe(self):
        """How pictures are shaped for this model (square crop, tiles, or the picture's own aspect)."""
        return self._recipe

    @property
    def max_image_tokens(self) -> int:
        """The most context positions one picture can take (a tiled picture depends on its shape)."""
        return self._recipe.max_image_tokens()

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
        return self._start({"role": "user", "content": parts}, options, None)

    def stream_messages(self, messages: Sequence[dict], **sampling) -> Iterator[str]:
        """Answer the last message of a whole conversation given at once, as stateless clients (HTTP
        APIs) send it; it replaces the session's conversation. Each message is {"role": "system" |
        "user" | "assistant", "content": str or [{"type": "text", "text"} | {"type": "image", "image"}]},
        parts in any order; an assistant message may carry "tokens" (its generated ids) so its KV
        entries are reused exactly. What the KV cache already holds of it is not evaluated again."""
        options = SamplingOptions.from_kwargs(self._seed, **sampling)
        converted = [self._message(m, i) for i, m in enumerate(messages)]
        if not converted or converted[-1]["role"] != "user":
            raise OptionError("the conversation must end with a user message")
        return self._start(converted[-1], options, converted[:-1])

    def _message(self, m, index: int) -> dict:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise OptionError(f"message {index}: needs a role of system, user or assistant")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise OptionError(f"message {index}: content must be a string or a list of parts")
        out = []
        for part in parts:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append({"type": "text", "text": part["text"]})
            elif isinstance(part, dict) and part.get("type") == "image" and "image" in part:
                out.append({"type": "image", "image": prepare(part["image"], self._recipe)})
            else:
                raise OptionError(f"message {index}: a part must be {{'type': 'text', 'text': ...}} or "
                                  "{'type': 'image', 'image': ...}")
        message = {"role": m["role"], "content": out}
        tokens = m.get("tokens")
        if m["role"] == "assistant" and isinstance(tokens, list) and all(type(t) is int for t in tokens):
            message["tokens"] = list(tokens)
        return message

    def _start(self, message: dict, options: SamplingOptions, history: list[dict] | None) -> Iterator[str]:
        self._acquire()
        if history is not None:
            self._messages = history
        self._cancel.clear()  # a cancel() from now on, even before the first next(), ends this turn
        self.last_turn = TurnStats()
        turn = _Turn(self, self._turn(message, options, self.last_turn))
        self._active = weakref.ref(turn)
        return turn

    @property
    def last_reply_tokens(self) -> list[int] | None:
        """The token ids of the last reply (None when a stop string cut it), for stream_messages."""
        last = self._messages[-1] if self._messages else None
        return list(last["tokens"]) if last and last["role"] == "assistant" and last.get("tokens") is not None else None

    def save_state(self) -> "ChatState":
        """The conversation and its KV cache, to restore later (another conversation may come between)."""
        with self._session():
            return ChatState(list(self._messages), self._kv.snapshot())

    def restore_state(self, state: "ChatState") -> bool:
        """Continue from a saved state; False (and a cleared session) when llama.cpp refuses the cache."""
        with self._session():
            self._messages = list(state.messages)
            if self._kv.restore(state.kv):
                return True
            self._clear()
            return False

    def prepare_image(self, image, max_decoded_bytes: int | None = None) -> PreparedImage:
        """Decode and check an image now (ImageError if it is refused); the result can be passed to
        ask()/stream() later without decoding it again. ``max_decoded_bytes`` caps the picture's
        decoded pixels (checked from its header, before decoding)."""
        return prepare(image, self._recipe, max_decoded_bytes or MAX_DECODED_BYTES)

    def batch(self, requests, **sampling) -> Iterator[BatchReply]:
        """Answer many independent questions, up to ``parallel`` of them decoded together (the
        context holds that many conversations): each request is a BatchRequest or a (prompt,
        images) pair, answered as a fresh conversation (the system
        prompt, then its pictures and text) exactly as ask() would answer it after reset().
        Yields a BatchReply per request in request order; a request whose picture cannot be read
        gets one with ``error`` and the others go on. Holds the session from this call until the
        iterator ends or is closed; cancel() ends it (requests not started get no reply). The
        session's own conversation is reset afterwards."""
        options = SamplingOptions.from_kwargs(self._seed, **sampling)
        self._acquire()
        self._cancel.clear()
        self.last_turn = TurnStats()
        base = [m for m in self._messages if m["role"] == "system"][:1]
        turn = _Turn(self, self._batch_body(requests, options, base))
        self._active = weakref.ref(turn)
        return turn

    def _batch_body(self, requests, options: SamplingOptions, base: list[dict]) -> Iterator[BatchReply]:
        try:
            with interrupts.deferred(self.cancel):
                yield from answer_all(self, requests, options, base, self._batch_message)
        finally:
            self._messages = list(base)  # the cache's spans are compared anew on the next turn

    def _batch_message(self, request) -> dict:
        if isinstance(request, BatchRequest):
            prompt, images = request.prompt, request.images
        elif isinstance(request, (tuple, list)) and len(request) == 2:
            prompt, images = request
        else:
            raise OptionError("a batch request is a BatchRequest or a (prompt, images) pair")
        if not isinstance(prompt, str):
            raise OptionError(f"a batch request's prompt must be a string, not {type(prompt).__name__}")
        parts = [{"type": "image", "image": prepare(img, self._recipe)} for img in _image_list(images)]
        return {"role": "user", "content": parts + [{"type": "text", "text": prompt}]}

    def next_token_logprobs(self, prompt: str, images: Sequence | None = ()) -> np.ndarray:
        """Log-probabilities of the first reply token (float64, one per vocabulary entry); the
        conversation does not advance. For parity checks and quality reports."""
        parts = [{"type": "image", "image": prepare(img, self._recipe)} for img in _image_list(images)]
        message = {"role": "user", "content": parts + [{"type": "text", "text": prompt}]}
        with self._session(), interrupts.deferred(self.cancel), self._cancellable():
            self.last_turn = TurnStats()
            self._prefill(self._messages + [message], self.last_turn)
            return self._kv.last_logprobs()

    def encode_image(self, image) -> np.ndarray:
        """The image's projected tokens as the language model receives them (n_tokens x n_embd,
        float32); the conversation is untouched. For parity checks and embedding uses."""
        prepared = prepare(image, self._recipe)
        with self._session(), interrupts.deferred(self.cancel), self._cancellable():
            return self._kv.encode_image(prepared)

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
        except Cancelled:
            raise CancelledError("cancelled") from None

    def _clear(self) -> None:
        self._messages = []
        if self._system:
            self._messages.append({"role": "system", "content": [{"type": "text", "text": self._system}]})
        self._kv.clear()

    # -- one turn --------------------------------------------------------------------------------
    def _turn(self, message: dict, options: SamplingOptions, stats: TurnStats) -> Iterator[str]:
        """The body of a streamed turn (run by _Turn, which holds the session lock)."""
        with interrupts.deferred(self.cancel):
            started = time.perf_counter()
            try:
                self._prefill(self._messages + [message], stats)
            except Cancelled:
                stats.finish_reason = "cancelled"  # the message is not added: the conversation is unchanged
                return
            self._messages.append(message)
            reply = {"role": "assistant", "content": [{"type": "text", "text": ""}], "tokens": []}
            self._messages.append(reply)
            for piece in generate(self._kv, options, stats, started, reply["tokens"]):
                reply["content"][0]["text"] += piece
                yield piece
            if stats.stop_string_hit:
                reply["tokens"] = None  # cut text no longer matches its tokens: re-tokenise it next turn

    def _prefill(self, messages: list[dict], stats: TurnStats, kv: KVSession | None = None) -> None:
        kv = kv or self._kv
        style = self.image_style
        pieces = render_prompt(self._template, style, messages, kv.special_text(llama_cpp.llama_vocab_bos(kv.vocab)),
                               kv.special_text(llama_cpp.llama_vocab_eos(kv.vocab)),
                               lambda text: kv.holds_markup(text) or (style.parts and style.placeholder in text))
        before = stats.images_encoded
        kv.prefill(pieces, stats)
        self.images_encoded_total += stats.images_encoded - before


@dataclass(frozen=True)
class ChatState:
    messages: list
    kv: KVSnapshot


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
    n_image = recipe.max_image_tokens()
    least = n_image + PROMPT_ROOM
    if type(n_ctx) is not int or not least <= n_ctx <= MAX_POSITIONS:
        up_to = "" if recipe.square else "up to "
        raise OptionError(f"n_ctx {n_ctx!r}: one image takes {up_to}{n_image} positions, so the context must be a "
                          f"whole number from {least} to {MAX_POSITIONS}")
    return n_ctx


def _image_newline(header, path: Path) -> np.ndarray:
    """The end-of-row embedding a tiled picture's features are packed with (check_file saw its shape)."""
    info = next(t for t in header.tensors if t.name == NEWLINE_TENSOR)
    return read_float_tensor(path, info)


def _image_style(fields: dict, path: Path, system: str | None) -> ImageStyle:
    """How the file's template places pictures, checked on the conversations this session will send (a
    system message only when one is given): a template that cannot render them is refused now, not
    mid-conversation. Ours name their placeholder; for files from elsewhere the usual ones are tried."""
    ours = fields.get(PLACEHOLDER_KEY)
    placeholders = ((ours,) if ours else ()) + (MEDIA_MARKER,) + KNOWN_PLACEHOLDERS
    try:
        return image_style(compile_template(fields["tokenizer.chat_template"]), placeholders,
                           skip=() if system else ("a system message",))
    except TemplateFailed as e:
        hint = "; leave out the system prompt" if system and "system" in str(e).lower() else ""
        raise ModelFilesError(f"{path}: the chat template cannot render a conversation ({e}){hint}") from None


def _open_contexts(files: ModelFiles, n_ctx: int, n_threads: int | None, n_gpu_layers: int, cache: CacheTypes,
                   verbose: bool, parallel: int = 1, recipe=None):
    llama_log.install(verbose)
    llm = LoadedModel(files.model, n_ctx_seq=n_ctx, n_seq=parallel, n_threads=n_threads or default_threads(),
                      n_gpu_layers=n_gpu_layers, n_batch=min(n_ctx, 2048), n_ubatch=min(n_ctx, N_UBATCH), cache=cache)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = n_gpu_layers > 0
    params.print_timings = verbose
    params.n_threads = llm.n_threads
    if recipe is not None and recipe.longest_edge:  # pictures come sized as the processor sizes them: mtmd
        params.image_min_tokens = 1  # must not resize them by its own token limits (Pixtral's: 8..1024)
        params.image_max_tokens = (recipe.longest_edge // recipe.patch_size) ** 2
    mctx = mtmd.mtmd_init_from_file(str(files.mmproj).encode(), llm.model, params)
    if not mctx:
        llm.close()
        raise ModelFilesError(f"{files.mmproj}: llama.cpp could not load the mmproj ({llama_log.recent()})")
    return llm, mctx
