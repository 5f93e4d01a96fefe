"""VisionChat: multi-turn image chat over llama.cpp's mtmd, keeping the KV cache between turns.

Each turn re-renders the whole conversation with the GGUF's own template, tokenizes it with mtmd,
and compares the result with what the KV cache already holds (text tokens and image ids). Only
what differs is evaluated: earlier images are not encoded again, earlier turns not re-read."""

from __future__ import annotations

import codecs
import ctypes
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np

from .. import llama_log
from ..errors import BusyError, ContextFullError, ModelFilesError
from ..system import default_threads
from ..templates import MEDIA_MARKER, sandbox
from .images import PreparedImage, prepare
from .model_files import ModelFiles, check_pair, pixel_recipe, read_fields, resolve
from .offload import N_UBATCH, plan_offload

PATCHED_BUILD = "+acestep.1"


@dataclass
class TurnStats:
    """What the last turn cost; tests and benchmarks read this instead of timing."""

    prompt_positions: int = 0  # positions the conversation occupies once the prompt is in the cache
    reused_positions: int = 0  # of those, already in the cache from earlier turns
    evaluated_positions: int = 0  # newly evaluated this turn (text tokens + image positions)
    images_encoded: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.completion_tokens - 1) / self.decode_s if self.completion_tokens > 1 and self.decode_s else 0.0


@dataclass
class _Cached:
    """One span of the KV cache: a text token or a whole image."""

    key: tuple  # ("t", token) or ("i", digest)
    n_pos: int


@dataclass
class SamplingOptions:
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 0.95
    seed: int | None = None
    stop: Sequence[str] = ()


class VisionChat:
    """A conversation about images with one loaded model. One generation at a time."""

    def __init__(self, files: ModelFiles, llm: llama_cpp.Llama, mctx, recipe, system: str | None, seed: int | None,
                 n_gpu_layers: int):
        self.files, self.model_path, self.quant = files, files.model, files.quant
        self.n_gpu_layers = n_gpu_layers
        self.offload_plan = None
        # Stock llama.cpp mis-orders llava's [CLS] token (ggml-org/llama.cpp#25814); tools/build_llama_cpp.sh fixes it.
        self.exact_vision = llama_cpp.__version__.endswith(PATCHED_BUILD)
        self._llm, self._mctx, self._recipe = llm, mctx, recipe
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._template = sandbox().from_string(llm.metadata.get("tokenizer.chat_template") or "")
        self._system, self._seed = system, seed
        self._messages: list[dict] = []
        self._cache: list[_Cached] = []
        self._piece_buf = ctypes.create_string_buffer(256)
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._abort_cb = llama_cpp.ggml_abort_callback(lambda _: self._cancel.is_set())
        llama_cpp.llama_set_abort_callback(llm.ctx, self._abort_cb, None)
        self.last_turn = TurnStats()
        self.images_encoded_total = 0
        self.reset()

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path | None = None, *, model: str | Path | None = None, mmproj: str | Path | None = None,
             quant: str | None = None, mmproj_quant: str | None = None, n_ctx: int = 8192, n_threads: int | None = None,
             n_gpu_layers: int | str = "auto", vram: str | int | None = None, system: str | None = None,
             seed: int | None = None, verbose: bool = False) -> "VisionChat":
        """Open a converted folder (or explicit model/mmproj paths) ready to chat."""
        files = resolve(folder, model=model, mmproj=mmproj, quant=quant, mmproj_quant=mmproj_quant)
        model_fields = read_fields(files.model, "language model")
        mmproj_fields = read_fields(files.mmproj, "mmproj")
        check_pair(model_fields, mmproj_fields, files)
        recipe = pixel_recipe(mmproj_fields, files.mmproj)
        offload = None
        if n_gpu_layers == "auto":
            offload = plan_offload(files.model, files.mmproj, vram=vram, n_ctx=n_ctx)
            n_gpu_layers = offload.n_gpu_layers
        llama_log.install(verbose)
        try:
            llm = llama_cpp.Llama(str(files.model), n_ctx=n_ctx, n_threads=n_threads or default_threads(),
                                  n_gpu_layers=int(n_gpu_layers), n_batch=min(n_ctx, 2048),
                                  n_ubatch=min(n_ctx, N_UBATCH), verbose=verbose)
        except ValueError as e:
            raise ModelFilesError(f"{files.model}: llama.cpp could not load it ({llama_log.recent() or e})") from None
        llama_log.install(verbose)  # Llama() installs its own logger; take it back
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = int(n_gpu_layers) > 0
        params.print_timings = verbose
        params.n_threads = llm.n_threads
        mctx = mtmd.mtmd_init_from_file(str(files.mmproj).encode(), llm.model, params)
        if not mctx:
            llm.close()
            raise ModelFilesError(f"{files.mmproj}: llama.cpp could not load the mmproj ({llama_log.recent()})")
        chat = cls(files, llm, mctx, recipe, system, seed, int(n_gpu_layers))
        chat.offload_plan = offload  # why n_gpu_layers is what it is, when it was planned
        return chat

    def close(self) -> None:
        if self._mctx:
            mtmd.mtmd_free(self._mctx)
            self._mctx = None
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def __enter__(self) -> "VisionChat":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- conversation ----------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self._llm.n_ctx()

    @property
    def messages(self) -> list[dict]:
        """The conversation so far, images shown by their source label."""
        return [{"role": m["role"], "content": [p if p["type"] == "text" else {"type": "image", "image": p["image"].label}
                                                for p in m["content"]]} for m in self._messages]

    def reset(self) -> None:
        """Start a new conversation (the same system prompt); the KV cache is cleared."""
        if self._lock.locked():
            raise BusyError("reset() while a generation is running: cancel() it first")
        self._messages = []
        if self._system:
            self._messages.append({"role": "system", "content": [{"type": "text", "text": self._system}]})
        self._cache = []
        self._n_past = 0  # positions held by the KV cache: the sum of self._cache's n_pos
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._llm.ctx), True)

    def cancel(self) -> None:
        """End the running generation soon (from any thread); the partial reply is kept."""
        self._cancel.set()

    def ask(self, prompt: str, images: Sequence = (), **sampling) -> str:
        """The whole reply to one user message."""
        return "".join(self.stream(prompt, images, **sampling))

    def stream(self, prompt: str, images: Sequence = (), **sampling) -> Iterator[str]:
        """Yield the reply piece by piece. Images come before the prompt text, in the given order."""
        options = SamplingOptions(**{k: v for k, v in sampling.items() if v is not None})
        if options.seed is None:
            options.seed = self._seed
        prepared = [prepare(img, self._recipe) for img in images]
        parts = [{"type": "image", "image": p} for p in prepared] + [{"type": "text", "text": prompt}]
        return self._run({"role": "user", "content": parts}, options)

    def next_token_logprobs(self, prompt: str, images: Sequence = ()) -> np.ndarray:
        """Log-probabilities of the first reply token (float64, one per vocabulary entry); the
        conversation does not advance. For parity checks and quality reports."""
        parts = [{"type": "image", "image": prepare(img, self._recipe)} for img in images]
        message = {"role": "user", "content": parts + [{"type": "text", "text": prompt}]}
        with self._lock_or_busy():
            self._cancel.clear()
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
        with self._lock_or_busy():
            chunks = self._tokenize(MEDIA_MARKER, [prepared], add_special=False)
            try:
                for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                    chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                    if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                        if mtmd.mtmd_encode_chunk(self._mctx, chunk) != 0:
                            raise ModelFilesError(f"llama.cpp failed to encode the image ({llama_log.recent()})")
                        n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                        width = llama_cpp.llama_model_n_embd(self._llm.model)
                        embd = ctypes.cast(mtmd.mtmd_get_output_embd(self._mctx), ctypes.POINTER(ctypes.c_float))
                        return np.ctypeslib.as_array(embd, shape=(n * width,)).reshape(n, width).copy()
            finally:
                mtmd.mtmd_input_chunks_free(chunks)
        raise ModelFilesError("mtmd produced no image chunk for the image")

    @contextmanager
    def _lock_or_busy(self):
        if not self._lock.acquire(blocking=False):
            raise BusyError("this VisionChat is already generating; wait for it or cancel() it")
        try:
            yield
        finally:
            self._lock.release()

    # -- one turn --------------------------------------------------------------------------------
    def _run(self, message: dict, options: SamplingOptions) -> Iterator[str]:
        with self._lock_or_busy():
            self._cancel.clear()
            self.last_turn = stats = TurnStats()
            started = time.perf_counter()
            self._prefill(self._messages + [message], stats)
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
        eos = self._piece(llama_cpp.llama_vocab_eos(self._vocab)).decode("utf-8", "replace")
        text = self._template.render(messages=rendered, add_generation_prompt=True, bos_token="", eos_token=eos)
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
            need = sum(s.n_pos for s in wanted)
            n_images = sum(1 for s in wanted if s.key[0] == "i")
            if need + 1 > self.n_ctx:
                raise ContextFullError(
                    f"the conversation needs {need} positions but the context holds {self.n_ctx} "
                    f"({n_images} image(s)); call reset() or load with a larger n_ctx")
            keep = self._common_prefix(wanted)
            self._truncate(keep)
            stats.reused_positions, stats.prompt_positions = self._n_past, need
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

    def _piece(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buf, 256, 0, False)
        return self._piece_buf.raw[:max(n, 0)]

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
                out, stop_hit = _release(text, sent, o.stop)
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
        except _Cancelled:
            stats.finish_reason = "cancelled"
        finally:
            llama_cpp.llama_sampler_free(sampler)
            if t_first is not None:
                stats.decode_s = time.perf_counter() - t_first


class _Cancelled(Exception):
    """Raised inside a turn when cancel() interrupts llama.cpp; never leaves VisionChat."""


def _release(text: str, sent: int, stops: Sequence[str]) -> tuple[str, bool]:
    """The text safe to yield now: up to a stop string if one appeared, else all but a possible stop prefix."""
    for stop in stops:
        at = text.find(stop, max(0, sent - len(stop)))
        if at >= 0:
            return text[sent:at], True
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return text[sent:len(text) - hold], False
