"""What the KV cache holds, and evaluating a prompt into it.

The cache is a list of spans — a text token by id, or a whole image by the digest of its pixels —
so a new prompt is compared with it span by span and only what differs is evaluated: an earlier
image is never encoded again. A picture goes through mtmd whole; a tiled one (LLaVA-NeXT) has each
tile encoded by mtmd, the features packed as transformers packs them (models/llava_next.py), and the
result decoded as embeddings — still one span. VisionChat is a conversation on top of this; a server
or a batch worker can drive it directly. One KVSession is one sequence of the context (``seq``); a context
made for several sequences has one KVSession each (runtime/batch.py decodes them together). Not
thread-safe: the owner serialises calls."""

from __future__ import annotations

import ctypes
import re
import threading
import weakref
from dataclasses import dataclass

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np

from .. import llama_log
from ..errors import ContextFullError, ModelFilesError
from ..models import llava_next
from ..templates import MEDIA_MARKER
from .generation import TurnStats
from .images import PreparedImage
from .prompt import TextPiece


class Cancelled(Exception):
    """The cancel event stopped llama.cpp mid-call; the owner turns it into a finish reason."""


class AbortFlag:
    """Set once the session's cancel event is, or ``extra`` (one batch sequence's own event). As
    llama.cpp's abort callback (called with its data pointer) it never raises; as a sequence's
    ``cancel`` it is checked with is_set()."""

    def __init__(self, base: threading.Event, extra: threading.Event | None = None):
        self.base, self.extra = base, extra

    def is_set(self) -> bool:
        extra = self.extra
        return self.base.is_set() or (extra is not None and extra.is_set())

    def __call__(self, _data) -> bool:
        return self.is_set()


@dataclass
class Span:
    """One span of the KV cache: a text token or a whole image."""

    key: tuple  # ("t", token) or ("i", digest)
    n_pos: int


@dataclass(frozen=True)
class KVSnapshot:
    """A copy of the cache's contents (llama.cpp's sequence state) and what it holds, to restore later."""

    spans: tuple  # ((key, n_pos), ...)
    n_past: int
    data: bytes


class KVSession:
    def __init__(self, llm, mctx, cancel: threading.Event, seq: int = 0, image_newline: np.ndarray | None = None):
        self.llm, self.mctx, self.cancel, self.seq = llm, mctx, cancel, seq
        self.image_newline = image_newline  # a tiled picture's end-of-row embedding (the mmproj's v.image_newline)
        self.vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._batch = TokenBatch(llm.n_batch)
        self.cache: list[Span] = []
        self.n_past = 0  # positions held by the KV cache: the sum of the cache's n_pos
        self._piece_buf = ctypes.create_string_buffer(256)
        self._vocab_facts: dict = {}  # "controls", "markup": found once per model, shared by siblings

    def sibling(self, seq: int) -> "KVSession":
        """A session on another sequence of the same context, sharing what was learnt of the vocabulary."""
        other = KVSession(self.llm, self.mctx, self.cancel, seq, self.image_newline)
        other._vocab_facts = self._vocab_facts
        return other

    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx()

    @property
    def add_bos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))

    @property
    def bos(self) -> int:
        return llama_cpp.llama_vocab_bos(self.vocab)

    def clear(self) -> None:
        self.cache, self.n_past = [], 0
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.llm.ctx), self.seq, -1, -1)

    def snapshot(self) -> KVSnapshot:
        """The KV cells of the conversation held now (host memory; a few hundred kB per token for 32B)."""
        ctx = self.llm.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, self.seq)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(ctx, buf, size, self.seq)
        return KVSnapshot(tuple((s.key, s.n_pos) for s in self.cache), self.n_past, bytes(buf)[:n])

    def restore(self, snap: KVSnapshot) -> bool:
        """Replace the cache with a snapshot; False (and an empty cache) if llama.cpp refuses it."""
        self.clear()
        if not snap.data:
            return False
        buf = (ctypes.c_uint8 * len(snap.data)).from_buffer_copy(snap.data)
        if llama_cpp.llama_state_seq_set_data(self.llm.ctx, buf, len(snap.data), self.seq) == 0:
            self.clear()
            return False
        self.cache, self.n_past = [Span(tuple(k), n) for k, n in snap.spans], snap.n_past
        return True

    # -- prompt -----------------------------------------------------------------------------------
    def prefill(self, pieces: list, stats: TurnStats) -> None:
        """Make the cache hold exactly the prompt ``pieces`` (prompt.render_prompt's output: text,
        pictures, spliced reply tokens), evaluating only what differs from what it holds; the last
        position's logits are fresh afterwards."""
        chunk_lists = []
        try:
            wanted: list[Span] = []
            sources: list = []  # per span: None (a text token) or the mtmd image chunk to evaluate
            if self.add_bos:  # where mtmd puts it: before everything
                wanted.append(Span(("t", self.bos), 1))
                sources.append(None)
            for piece in pieces:
                if isinstance(piece, TextPiece):
                    tokens = self.tokenize_text(piece.text, piece.protected)
                elif piece[0] == "tokens":
                    tokens = piece[1]
                elif piece[1].layout is not None:  # a tiled picture: packed and evaluated here
                    wanted.append(Span(("i", piece[1].digest), piece[1].n_tokens))
                    sources.append(piece[1])
                    continue
                else:
                    chunks = self.tokenize_image(piece[1])
                    chunk_lists.append(chunks)
                    self._spans(chunks, [piece[1]], wanted, sources)
                    continue
                wanted += [Span(("t", t), 1) for t in tokens]
                sources += [None] * len(tokens)
            if self.add_bos and len(wanted) > 1 and wanted[1].key == ("t", self.bos):
                del wanted[0], sources[0]  # the template wrote BOS itself (Pixtral's): one, as transformers has
            if not wanted:
                raise ModelFilesError("the chat template rendered an empty prompt")
            need = sum(s.n_pos for s in wanted)
            if need + 1 > self.n_ctx:
                n_images = sum(1 for s in wanted if s.key[0] == "i")
                raise ContextFullError(f"the conversation needs {need} positions but the context holds {self.n_ctx} "
                                       f"({n_images} image(s)); start a new conversation or use a larger context")
            keep = self.common_prefix(wanted)
            self.truncate(keep)
            stats.reused_positions, stats.prompt_positions = self.n_past, need
            if self.cancel.is_set():
                raise Cancelled()
            self._eval(wanted[keep:], sources[keep:], stats)
        finally:
            for chunks in chunk_lists:
                mtmd.mtmd_input_chunks_free(chunks)

    def tokenize_image(self, img: PreparedImage):
        """mtmd's chunks for one picture (its image chunk, and any text mtmd puts around it)."""
        return self._tokenize_pixels(img.rgb, *img.width_height, img.digest)

    def _tokenize_pixels(self, rgb: bytes, width: int, height: int, digest: str):
        data = (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb)
        bitmap = mtmd.mtmd_bitmap_init(width, height, data)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            mtmd.mtmd_bitmap_set_id(bitmap, digest.encode())
            marker = MEDIA_MARKER.encode()
            inp = mtmd.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
            array = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            status = mtmd.mtmd_tokenize(self.mctx, chunks, ctypes.byref(inp), array, 1)
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        if status != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            raise ModelFilesError(f"mtmd could not prepare a picture (status {status}: {llama_log.recent()})")
        return chunks

    def tokenize_text(self, text: str, protected: tuple = ()) -> list[int]:
        """Token ids of prompt text, as llama.cpp tokenizes with special tokens parsed — except inside
        ``protected`` ranges (message text), where a control token's text is plain text."""
        if not protected:
            return self._tokenize(text, special=True)
        tokens: list[int] = []
        for fragment in partition(text, protected, self.controls):
            tokens += [fragment] if isinstance(fragment, int) else self._tokenize(fragment, special=False)
        return tokens

    def _tokenize(self, text: str, special: bool) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            buf = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, size, False, special)
            if n >= 0:
                return buf[:n]
            size = -n

    @property
    def controls(self) -> list[tuple[str, int]]:
        """(text, id) of every control token, longest first (the order llama.cpp matches them in)."""
        if "controls" not in self._vocab_facts:
            wanted = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
            found = [(self.piece(t, special=True).decode("utf-8", "replace"), t)
                     for t in range(llama_cpp.llama_vocab_n_tokens(self.vocab))
                     if llama_cpp.llama_vocab_get_attr(self.vocab, t) & wanted]
            self._vocab_facts["controls"] = sorted([c for c in found if c[0]], key=lambda c: -len(c[0]))
        return self._vocab_facts["controls"]

    def holds_markup(self, text: str) -> bool:
        """Would this message text be read as markup: a control token's text or mtmd's marker (one
        regex pass, however many control tokens the vocabulary has)."""
        if "markup" not in self._vocab_facts:
            self._vocab_facts["markup"] = re.compile("|".join(re.escape(t) for t in [MEDIA_MARKER] +
                                                               [c for c, _ in self.controls]))
        return self._vocab_facts["markup"].search(text) is not None

    @staticmethod
    def _spans(chunks, images, wanted: list, sources: list) -> None:
        image_iter = iter(images)
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                wanted += [Span(("t", tokens[j]), 1) for j in range(n.value)]
                sources += [None] * n.value
            else:
                wanted.append(Span(("i", next(image_iter).digest), mtmd.mtmd_input_chunk_get_n_pos(chunk)))
                sources.append(chunk)

    def common_prefix(self, wanted: list[Span]) -> int:
        n = 0
        for have, want in zip(self.cache, wanted):
            if have.key != want.key:
                break
            n += 1
        return min(n, len(wanted) - 1)  # evaluate at least the last token to get fresh logits

    def truncate(self, keep: int) -> None:
        self.n_past = sum(s.n_pos for s in self.cache[:keep])
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.llm.ctx), self.seq, self.n_past, -1)
        del self.cache[keep:]

    # -- evaluation -------------------------------------------------------------------------------
    def _eval(self, spans: list[Span], sources: list, stats: TurnStats) -> None:
        """Evaluate text tokens in batches and images through mtmd's encoder, in prompt order."""
        pending: list[Span] = []
        for span, chunk in zip(spans, sources):
            if chunk is None:
                pending.append(span)
                continue
            self.decode_text(pending, stats)
            pending = []
            if isinstance(chunk, PreparedImage):
                self._decode_tiled(chunk, span, stats)
            else:
                self._decode_image(chunk, span, stats)
        self.decode_text(pending, stats)

    def decode_text(self, spans: list[Span], stats: TurnStats) -> None:
        batch = self.llm.n_batch
        for start in range(0, len(spans), batch):
            part = spans[start:start + batch]
            self._batch.fill([(s.key[1], self.n_past + i, self.seq, i == len(part) - 1) for i, s in enumerate(part)])
            self._check_decode(llama_cpp.llama_decode(self.llm.ctx, self._batch.batch))
            self.cache += part
            self.n_past += len(part)
            stats.evaluated_positions += len(part)

    def decode_token(self, token: int) -> None:
        """Append one generated token (not counted as prompt evaluation)."""
        self.decode_text([Span(("t", token), 1)], TurnStats())

    def appended(self, token: int) -> None:
        """A generated token was decoded into this sequence by a batch of several (runtime/batch.py)."""
        self.cache.append(Span(("t", token), 1))
        self.n_past += 1

    def _decode_image(self, chunk, span: Span, stats: TurnStats) -> None:
        if self.cancel.is_set():
            raise Cancelled()
        new_n_past = llama_cpp.llama_pos(0)
        status = mtmd.mtmd_helper_eval_chunk_single(self.mctx, self.llm.ctx, chunk, self.n_past, self.seq,
                                                    self.llm.n_batch, False, ctypes.byref(new_n_past))
        if self.cancel.is_set():
            self.truncate(len(self.cache))
            raise Cancelled()
        if status != 0:
            self.truncate(len(self.cache))
            raise ModelFilesError(f"llama.cpp failed to encode an image (status {status}: {llama_log.recent()})")
        self.cache.append(span)
        self.n_past += span.n_pos
        stats.evaluated_positions += span.n_pos
        stats.images_encoded += 1

    def _check_decode(self, status: int) -> None:
        if status == 0:
            return
        self.truncate(len(self.cache))  # drop whatever part of the batch did land
        raise decode_error(status, self.cancel.is_set(), self.n_ctx)

    def _decode_tiled(self, image: PreparedImage, span: Span, stats: TurnStats) -> None:
        """A tiled picture: its packed features decoded as embeddings at the next positions."""
        embeddings = self.encode_image(image)
        rows = self.llm.n_batch
        batch = llama_cpp.llama_batch_init(rows, embeddings.shape[1], 1)
        try:
            for start in range(0, len(embeddings), rows):
                part = np.ascontiguousarray(embeddings[start:start + rows], dtype=np.float32)
                ctypes.memmove(batch.embd, part.ctypes.data, part.nbytes)
                for i in range(len(part)):
                    batch.pos[i], batch.n_seq_id[i], batch.logits[i] = self.n_past + start + i, 1, False
                    batch.seq_id[i][0] = self.seq
                batch.logits[len(part) - 1] = start + len(part) == len(embeddings)  # fresh logits after the picture
                batch.n_tokens = len(part)
                status = llama_cpp.llama_decode(self.llm.ctx, batch)
                if status != 0 or self.cancel.is_set():
                    self.truncate(len(self.cache))  # drop the part of the picture that landed
                    raise decode_error(status, self.cancel.is_set(), self.n_ctx)
        finally:
            llama_cpp.llama_batch_free(batch)
        self.cache.append(span)
        self.n_past += span.n_pos
        stats.evaluated_positions += span.n_pos
        stats.images_encoded += 1

    def encode_image(self, image: PreparedImage) -> np.ndarray:
        """The image's projected tokens (n_tokens x n_embd, float32) as the language model receives
        them — for a tiled picture, every tile encoded and the features packed; the cache is untouched."""
        if image.layout is None:
            return self._encode_pixels(image.rgb, *image.width_height, image.digest)
        if self.image_newline is None:
            raise ModelFilesError("a tiled picture needs the mmproj's v.image_newline, which was not loaded")
        tiles = []
        for i, rgb in enumerate((image.rgb,) + image.tiles):
            if self.cancel.is_set():
                raise Cancelled()
            tiles.append(self._encode_pixels(rgb, image.size, image.size, f"{image.digest}/{i}"))
        return llava_next.pack(np.stack(tiles), image.layout, self.image_newline)

    def _encode_pixels(self, rgb: bytes, width: int, height: int, digest: str) -> np.ndarray:
        """One picture through mtmd, at the size it was prepared to: its projected tokens."""
        chunks = self._tokenize_pixels(rgb, width, height, digest)
        try:
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    if mtmd.mtmd_encode_chunk(self.mctx, chunk) != 0:
                        raise ModelFilesError(f"llama.cpp failed to encode the image ({llama_log.recent()})")
                    if self.cancel.is_set():
                        raise Cancelled()
                    n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                    width = llama_cpp.llama_model_n_embd(self.llm.model)
                    embd = ctypes.cast(mtmd.mtmd_get_output_embd(self.mctx), ctypes.POINTER(ctypes.c_float))
                    return np.ctypeslib.as_array(embd, shape=(n * width,)).reshape(n, width).copy()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        raise ModelFilesError("mtmd produced no image chunk for the image")

    def last_logprobs(self) -> np.ndarray:
        """Log-probabilities (float64) of the token after the last evaluated position."""
        n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(n_vocab,))
        shifted = logits.astype(np.float64) - logits.max()
        return shifted - np.log(np.exp(shifted).sum())

    # -- tokens as text ---------------------------------------------------------------------------
    def piece(self, token: int, special: bool = False) -> bytes:
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, special)
        return self._piece_buf.raw[:max(n, 0)]

    def special_text(self, token: int) -> str:
        """A control token's own text (<|im_end|>), as templates expect for eos_token / bos_token."""
        return self.piece(token, special=True).decode("utf-8", "replace") if token >= 0 else ""


def decode_error(status: int, cancelled: bool, n_ctx: int) -> Exception:
    """What a failed llama_decode means, as the exception to raise."""
    if status == 2 or cancelled:
        return Cancelled()
    if status == 1:
        return ContextFullError(f"no room left in the {n_ctx}-token context; call reset() or use a larger n_ctx")
    return ModelFilesError(f"llama_decode failed with status {status} ({llama_log.recent()})")


class TokenBatch:
    """A llama_batch of up to ``size`` tokens, each with its position, sequence and whether its
    logits are wanted; allocated once, freed with its owner."""

    def __init__(self, size: int):
        self.batch = llama_cpp.llama_batch_init(size, 0, 1)
        weakref.finalize(self, llama_cpp.llama_batch_free, self.batch)

    def fill(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """(token, position, sequence, logits) per row."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(rows)


def partition(text: str, protected: tuple, controls: list[tuple[str, int]]) -> list:
    """``text`` split at control tokens (ids) into raw fragments (str), as llama.cpp's special-token
    partition splits it (each token in ``controls`` order, leftmost first), but never at an
    occurrence that overlaps a protected range."""
    def free(start: int, end: int) -> bool:
        return not any(a < end and start < b for a, b in protected)

    items: list = [(0, len(text))]  # raw fragments as (start, end), tokens as ints
    for control, token in controls:
        out: list = []
        for item in items:
            if isinstance(item, int):
                out.append(item)
                continue
            start, end = item
            at = search = start
            while (found := text.find(control, search, end)) >= 0:
                if free(found, found + len(control)):
                    if found > at:
                        out.append((at, found))
                    out.append(token)
                    at = found + len(control)
                search = found + 1 if at <= found else at
            if at < end:
                out.append((at, end))
        items = out
    return [item if isinstance(item, int) else text[item[0]:item[1]] for item in items]
