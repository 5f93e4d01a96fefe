"""One loaded model behind the HTTP APIs: requests run one at a time in arrival order (asyncio's
lock wakes waiters first come, first served); the generation itself runs in a worker thread and its
pieces are handed to the event loop. A client that goes away cancels its own generation (never
another's: one still waiting for its turn is just dropped); the model is handed to the next request
only when the worker thread has really stopped, whatever happens to the request's task.

Stateless clients resend the whole conversation every time. The VisionChat's KV cache already
reuses whatever prefix it holds; the engine adds (1) other conversations' saved states, swapped in
when one shares a longer prefix with the request than what the cache holds, and (2) the token ids of
recent replies, so that a reply sent back as text is matched token for token."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from ..runtime.chat import VisionChat
from ..runtime.generation import TurnStats
from .store import StateStore, common, message_keys

log = logging.getLogger("acestep_gguf.server")
MAX_REMEMBERED_REPLIES = 512


@dataclass
class Result:
    """What a request produced (its text and the turn's stats), and its way to give up."""

    text: str = ""
    stats: TurnStats = field(default_factory=TurnStats)
    abandoned: threading.Event = field(default_factory=threading.Event)
    running_on: VisionChat | None = None  # set on the event loop while this request's turn runs

    def abandon(self) -> None:
        """The client went away: stop this request's generation, or never start it. Event loop only."""
        self.abandoned.set()
        if self.running_on is not None:
            self.running_on.cancel()


class Engine:
    def __init__(self, chat: VisionChat, store: StateStore, name: str):
        self.chat, self.store, self.name = chat, store, name
        self.current_keys: tuple = ()
        self.replies: OrderedDict[str, list[int]] = OrderedDict()
        self._lock: asyncio.Lock | None = None
        self.requests = 0  # served (a turn was started for them)
        self.waiting = 0  # waiting for the model now
        self.dropped = 0  # given up by their clients before their turn came
        self.stopping = False  # the server is shutting down: no new turns, the running one cancelled

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    # -- in the worker thread ---------------------------------------------------------------------
    def prepare(self, messages: list[dict], max_decoded_bytes: int | None = None) -> list[dict]:
        """Decode and check every image now (errors before any response is started)."""
        out = []
        for m in messages:
            content = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            parts = [{"type": "image", "image": self.chat.prepare_image(p["image"], max_decoded_bytes)}
                     if p["type"] == "image" else p for p in content]
            out.append({"role": m["role"], "content": parts})
        return out

    def _run(self, messages: list[dict], sampling: dict, emit, result: Result) -> None:
        keys = message_keys(messages)
        for m in messages:  # a reply we generated comes back as text: give it back its token ids
            if m["role"] == "assistant":
                text = "".join(p.get("text", "") for p in m["content"])
                if text in self.replies:
                    m["tokens"] = self.replies[text]
        held = common(self.current_keys, keys)
        if self.current_keys and held < len(self.current_keys):
            # this request does not continue the conversation the cache holds: keep that one first
            self.store.put(self.current_keys, self.chat.save_state())
        found = self.store.best(keys, better_than=held)
        if found is not None:
            if self.chat.restore_state(found[1]):
                log.info("restored a saved conversation state (%d cached positions)", found[1].kv.n_past)
            else:  # llama.cpp refused it: never offered again
                log.warning("llama.cpp refused a saved conversation state; dropped it")
                self.store.drop(found[0])
        self.current_keys = ()  # until this turn ends well, the cache holds no known conversation
        pieces = self.chat.stream_messages(messages, **sampling)
        if result.abandoned.is_set() or self.stopping:  # given up after the worker started, before the turn began
            self.chat.cancel()
        for piece in pieces:
            result.text += piece
            emit(piece)
        result.stats = self.chat.last_turn
        tokens = self.chat.last_reply_tokens
        if tokens is not None:
            self.replies[result.text] = tokens
            self.replies.move_to_end(result.text)
            while len(self.replies) > MAX_REMEMBERED_REPLIES:
                self.replies.popitem(last=False)
        reply = {"role": "assistant", "content": [{"type": "text", "text": result.text}]}
        # a turn cancelled before its first token may have left the conversation as it was: unknown
        kept = result.stats.finish_reason != "cancelled" or result.stats.completion_tokens > 0
        self.current_keys = keys + message_keys([reply]) if kept else ()
        t = result.stats
        log.info("request %d: %d prompt positions, %d from the cache, %d images encoded, %d tokens (%s)",
                 self.requests, t.prompt_positions, t.reused_positions, t.images_encoded, t.completion_tokens,
                 t.finish_reason)

    # -- on the event loop ------------------------------------------------------------------------
    async def generate(self, messages: list[dict], sampling: dict, result: Result):
        """Yield the reply's pieces. The model is this request's from its turn's first step until the
        worker thread ends; the lock is released by the worker's last act, so a task cancelled in
        any await (anyio cancels every await of a cancelled scope) cannot hand the model on early."""
        self.waiting += 1
        try:
            await self.lock.acquire()
        except asyncio.CancelledError:  # a streaming client that went away while waiting
            self.dropped += 1
            raise
        finally:
            self.waiting -= 1
        worker = None
        try:
            if result.abandoned.is_set():
                self.dropped += 1
                return
            if self.stopping:  # its turn came during shutdown: it ends now, answered, without generating
                result.stats.finish_reason = "cancelled"
                return
            self.requests += 1
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()

            def post(*item) -> None:
                try:
                    loop.call_soon_threadsafe(*item)
                except RuntimeError:  # the loop has closed: the server is stopping, nobody waits
                    pass

            def hand_on() -> None:
                result.running_on = None
                self.lock.release()

            def work() -> None:
                try:
                    self._run(messages, sampling, lambda piece: post(queue.put_nowait, ("piece", piece)), result)
                    post(queue.put_nowait, ("done", None))
                except BaseException as e:  # handed to the event loop, raised there
                    post(queue.put_nowait, ("error", e))
                finally:
                    post(hand_on)

            result.running_on = self.chat
            thread = threading.Thread(target=work, name="acestep-generate", daemon=True)
            thread.start()
            worker = thread
            try:
                while True:
                    kind, value = await queue.get()
                    if kind == "piece":
                        yield value
                    elif kind == "error":
                        raise value
                    else:
                        break
            finally:
                if worker.is_alive():  # the client went away (or the server stops): stop generating
                    result.abandon()
        finally:
            if worker is None:  # no turn was started: the model is free at once
                result.running_on = None
                self.lock.release()

    def shutdown(self) -> None:
        """The server is stopping (SIGTERM / SIGINT): the running turn is cancelled, so its stream
        ends with a proper final chunk, and waiting requests end at once. Safe from a signal handler."""
        self.stopping = True
        self.chat.cancel()

    def close(self) -> None:
        """Keep the conversation the cache holds for the next start, then free the model."""
        try:
            if self.current_keys:
                self.store.put(self.current_keys, self.chat.save_state())
        finally:
            self.chat.close()
