"""Saved conversation states (messages + KV cache), so that two clients taking turns both keep their
cache, and a restarted server answers a repeated conversation from disk.

States are found by the conversation's message-level key prefix (a digest per message: role, text,
image pixel digests); the KV session's token-level compare then reuses exactly what matches. In
memory: least recently used first out, within ``max_bytes``; a state whose conversation is a prefix of
another kept state is not kept twice (the longer one serves it: the KV session truncates). On disk
(optional): a subfolder per model identity (files, context), so servers of other models sharing the
folder never touch each other's states; one file per state, written as *.partial then renamed, with
a header naming the model and a sha256 of the payload. Only regular files are opened (a FIFO, a
directory or a symlink named *.kv is skipped, never waited on); a file that is foreign, truncated,
corrupt or inconsistent with the model and context is deleted, never trusted."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFilesError
from ..files import open_regular
from ..runtime.chat import ChatState
from ..models.llava_next import MAX_TILES, AnyresLayout
from ..runtime.images import MAX_PIXELS, PixelRecipe, PreparedImage
from ..runtime.kv_session import KVSnapshot

MAGIC = b"ACESTEP-KV1\n"
log = logging.getLogger("acestep_gguf.server")


class StateLimits:
    """What a restored state must fit: the model's vocabulary and the server's context."""

    def __init__(self, n_ctx: int, n_vocab: int, recipe: PixelRecipe):
        self.n_ctx, self.n_vocab, self.recipe = n_ctx, n_vocab, recipe

    def problem(self, state: ChatState) -> str | None:
        kv = state.kv
        if not kv.data:
            return "no KV data"
        if not 0 < kv.n_past < self.n_ctx:
            return f"{kv.n_past} positions for a {self.n_ctx}-position context"
        total = 0
        for key, n in kv.spans:
            ok = (isinstance(key, tuple) and len(key) == 2 and type(n) is int and (
                (key[0] == "t" and type(key[1]) is int and 0 <= key[1] < self.n_vocab and n == 1)
                or (key[0] == "i" and isinstance(key[1], str) and 0 < n < self.n_ctx)))
            if not ok:
                return "a malformed span"
            total += n
        if total != kv.n_past:
            return f"spans of {total} positions for n_past {kv.n_past}"
        for m in state.messages:
            if m.get("role") not in ("system", "user", "assistant"):
                return "a message without a known role"
            for part in m["content"]:
                image = part.get("image")
                if image is not None and not self._fits(image):
                    return "a picture of the wrong size"
            tokens = m.get("tokens")
            if tokens is not None and not all(0 <= t < self.n_vocab for t in tokens):
                return "a reply token outside the vocabulary"
        return None


    def _fits(self, image: PreparedImage) -> bool:
        """What ``prepare`` makes for this model's recipe: one square crop, the tiles and layout the
        picture's size gives, or a picture at its own size in whole patches."""
        r, tile_bytes = self.recipe, 3 * self.recipe.image_size ** 2
        if image.size != r.image_size:
            return False
        if r.pinpoints:
            where = image.layout
            return (where is not None and not image.shape and 0 < where.height * where.width <= MAX_PIXELS
                    and r.layout(where.height, where.width) == where and len(image.tiles) == where.rows * where.cols
                    and all(len(rgb) == tile_bytes for rgb in (image.rgb,) + image.tiles))
        if r.longest_edge:
            shape = image.shape
            return (image.layout is None and not image.tiles and len(shape) == 2
                    and all(0 < side <= r.longest_edge and side % r.patch_size == 0 for side in shape)
                    and len(image.rgb) == 3 * shape[0] * shape[1])
        return image.layout is None and not image.tiles and not image.shape and len(image.rgb) == tile_bytes


def _open_state(path: Path):
    """A state file: a regular file only, never a symlink followed or a FIFO waited on."""
    return open_regular(path, ModelFilesError, "state file", follow_symlinks=False)


def message_keys(messages: list[dict]) -> tuple[str, ...]:
    """One digest per message: what the KV cache of that message depends on."""
    keys = []
    for m in messages:
        h = hashlib.sha256(m["role"].encode())
        for part in m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]:
            image = part.get("image")
            h.update(b"\x00i" + image.digest.encode() if isinstance(image, PreparedImage) else
                     b"\x00t" + str(part.get("text", "")).encode("utf-8", "surrogatepass"))
        keys.append(h.hexdigest()[:24])
    return tuple(keys)


def common(a: tuple, b: tuple) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _Entry:
    keys: tuple
    state: ChatState | None  # None: on disk only
    n_bytes: int
    path: Path | None = None


class StateStore:
    def __init__(self, max_bytes: int, folder: Path | None, model_id: str, limits: StateLimits | None = None):
        """``folder`` is the cache folder; states live in its subfolder named ``model_id``."""
        self.max_bytes, self.model_id, self.limits = max_bytes, model_id, limits
        self.folder = folder / model_id if folder is not None else None
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.hits = self.misses = self.dropped = 0
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._scan()

    # -- finding and keeping ----------------------------------------------------------------------
    def best(self, keys: tuple, better_than: int) -> tuple[tuple, ChatState] | None:
        """(its keys, the saved state) sharing the longest message prefix with ``keys`` (more than
        ``better_than``), or None."""
        ranked = sorted(self.entries.values(), key=lambda e: common(e.keys, keys), reverse=True)
        for entry in ranked:
            if common(entry.keys, keys) <= better_than:
                break
            state = entry.state or self._load(entry)
            if state is not None:
                self.entries.move_to_end(entry.keys)
                self.hits += 1
                return entry.keys, state
        self.misses += 1
        return None

    def put(self, keys: tuple, state: ChatState) -> None:
        if not keys:
            return
        n_bytes = len(state.kv.data)
        if n_bytes > self.max_bytes:
            return
        if any(len(k) > len(keys) and k[:len(keys)] == keys for k in self.entries):
            return  # a longer kept conversation already holds this one's cache
        for shorter in [k for k in self.entries if len(k) < len(keys) and keys[:len(k)] == k]:
            self.drop(shorter)  # this state serves that prefix too
        old = self.entries.pop(keys, None)
        entry = _Entry(keys, state, n_bytes, old.path if old else None)
        if self.folder is not None:
            entry.path = self._write(keys, state)
        self.entries[keys] = entry
        self._evict()

    def drop(self, keys: tuple) -> None:
        """Forget a state (llama.cpp refused it, or it is superseded), in memory and on disk."""
        entry = self.entries.pop(keys, None)
        if entry is not None and entry.path is not None:
            entry.path.unlink(missing_ok=True)

    @property
    def n_bytes(self) -> int:
        return sum(e.n_bytes for e in self.entries.values())

    def _evict(self) -> None:
        while sum(e.n_bytes for e in self.entries.values()) > self.max_bytes and self.entries:
            _, entry = self.entries.popitem(last=False)
            if entry.path is not None:
                entry.path.unlink(missing_ok=True)

    # -- disk -------------------------------------------------------------------------------------
    def _write(self, keys: tuple, state: ChatState) -> Path:
        payload = _plain(state)
        header = json.dumps({"model": self.model_id, "keys": list(keys), "bytes": len(payload),
                             "kv_bytes": len(state.kv.data), "sha256": hashlib.sha256(payload).hexdigest()}).encode()
        path = self.folder / (hashlib.sha256("/".join(keys).encode()).hexdigest()[:32] + ".kv")
        tmp = path.with_suffix(".kv.partial")
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(header)) + header + payload)
        os.replace(tmp, path)
        return path

    def _header(self, path: Path) -> dict | None:
        try:
            with _open_state(path) as f:
                if f.read(len(MAGIC)) != MAGIC:
                    return None
                (n,) = struct.unpack("<I", f.read(4))
                if n > 1 << 20:
                    return None
                header = json.loads(f.read(n))
            ok = (isinstance(header, dict) and header.get("model") == self.model_id
                  and isinstance(header.get("keys"), list) and all(isinstance(k, str) for k in header["keys"])
                  and isinstance(header.get("bytes"), int) and isinstance(header.get("kv_bytes"), int)
                  and path.stat().st_size == len(MAGIC) + 4 + n + header["bytes"])
            return {**header, "offset": len(MAGIC) + 4 + n} if ok else None
        except (OSError, ValueError, struct.error, ModelFilesError):
            return None

    def _scan(self) -> None:
        files = []
        with os.scandir(self.folder) as it:
            for item in it:
                if not item.name.endswith((".kv", ".kv.partial")):
                    continue
                if not item.is_file(follow_symlinks=False):  # a FIFO, directory or symlink: never opened
                    log.warning("state cache: skipping %s (not a regular file)", item.name)
                    continue
                if item.name.endswith(".partial"):
                    os.unlink(item.path)
                else:
                    files.append((item.stat(follow_symlinks=False).st_mtime, Path(item.path)))
        for _, path in sorted(files):
            header = self._header(path)
            if header is None:  # foreign, old or damaged: replaced, never trusted
                path.unlink(missing_ok=True)
                continue
            keys = tuple(header["keys"])
            self.entries[keys] = _Entry(keys, None, header["kv_bytes"], path)
        self._evict()

    def _load(self, entry: _Entry) -> ChatState | None:
        header = self._header(entry.path) if entry.path else None
        try:
            if header is None:
                raise ValueError("bad header")
            with _open_state(entry.path) as f:
                f.seek(header["offset"])
                payload = f.read(header["bytes"])
            if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
                raise ValueError("checksum")
            state = _from_plain(payload)
            why = self.limits.problem(state) if self.limits else None
            if why:
                raise ValueError(why)
            return state
        except Exception as e:
            log.warning("state cache: dropping %s (%s)", entry.path.name if entry.path else "a state",
                        str(e).splitlines()[0][:100] if str(e) else type(e).__name__)
            self.dropped += 1
            self.entries.pop(entry.keys, None)
            if entry.path is not None and entry.path.is_file():
                entry.path.unlink(missing_ok=True)
            return None


def _plain(state: ChatState) -> bytes:
    """Only plain data goes to disk — JSON (texts, token ids, image digests, spans) then raw blobs
    (image pixels, the KV bytes) — nothing that runs code when read back."""
    blobs: list[bytes] = []

    def blob(data: bytes) -> list[int]:
        blobs.append(data)
        return [sum(len(b) for b in blobs[:-1]), len(data)]

    messages = []
    for m in state.messages:
        content = [_plain_image(p["image"], blob) if p["type"] == "image" else {"type": "text", "text": p["text"]}
                   for p in m["content"]]
        messages.append({"role": m["role"], "content": content, "tokens": m.get("tokens")})
    doc = json.dumps({"messages": messages, "spans": [[list(k), n] for k, n in state.kv.spans],
                      "n_past": state.kv.n_past, "kv": blob(state.kv.data)}).encode()
    return struct.pack("<Q", len(doc)) + doc + b"".join(blobs)


def _from_plain(payload: bytes) -> ChatState:
    (n,) = struct.unpack_from("<Q", payload)
    doc, data = json.loads(payload[8:8 + n]), memoryview(payload)[8 + n:]

    def blob(ref) -> bytes:
        start, length = ref
        if not (0 <= start and start + length <= len(data)):
            raise ValueError("blob outside the file")
        return bytes(data[start:start + length])

    messages = []
    for m in doc["messages"]:
        content = [{"type": "image", "image": _image_from_plain(p, blob)}
                   if p["type"] == "image" else {"type": "text", "text": str(p["text"])} for p in m["content"]]
        message = {"role": str(m["role"]), "content": content}
        if m.get("tokens") is not None:
            message["tokens"] = [int(t) for t in m["tokens"]]
        messages.append(message)
    spans = tuple((tuple(k), int(n)) for k, n in doc["spans"])
    return ChatState(messages, KVSnapshot(spans, int(doc["n_past"]), blob(doc["kv"])))


def _plain_image(image: PreparedImage, blob) -> dict:
    where = image.layout
    return {"type": "image", "rgb": blob(image.rgb), "size": image.size, "digest": image.digest, "label": image.label,
            "tiles": [blob(rgb) for rgb in image.tiles], "shape": list(image.shape),
            "layout": None if where is None else [where.height, where.width, where.rows, where.cols, where.side,
                                                  *where.keep_rows, *where.keep_cols]}


def _image_from_plain(p: dict, blob) -> PreparedImage:
    """A picture read back; StateLimits checks it against the model before use."""
    tiles, where = p.get("tiles") or [], p.get("layout")
    if len(tiles) > MAX_TILES:
        raise ValueError("too many tiles")
    layout = None if where is None else AnyresLayout(*[int(v) for v in where[:5]], (int(where[5]), int(where[6])),
                                                     (int(where[7]), int(where[8])))
    shape = tuple(int(s) for s in p.get("shape") or ())
    return PreparedImage(blob(p["rgb"]), int(p["size"]), str(p["digest"]), str(p["label"]),
                         tuple(blob(t) for t in tiles), layout, shape)
