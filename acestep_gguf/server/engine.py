"""One loaded model behind the HTTP APIs, answering up to ``parallel`` requests at once.

The model's context holds ``parallel`` sequences, its slots (serve --parallel). One scheduler thread
owns the VisionChat: it starts waiting requests on free slots in arrival order (FIFO), prefills
each alone and then decodes every running request together, one token each per llama_decode
(runtime/batch.py). Pieces are handed to the event loop as they come. A client that goes away
cancels its own generation only (one still waiting for a slot is just dropped); server shutdown
cancels them all, each stream getting its final chunk.

Stateless clients resend the whole conversation every time. Each slot's KV cache reuses whatever
prefix it holds, and a request goes to the free slot holding the longest prefix of it; the engine
adds (1) saved states of other conversations (StateStore), restored into a slot when one shares a
longer prefix with the request than any free slot holds, a slot's own conversation being saved
before another replaces it, and (2) the token ids of recent replies, so that a reply sent back as
text is matched token for token."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from ..errors import AcestepGGUFError, OptionError
from ..runtime.batch import BatchCounters, Batcher, Job
from ..runtime.chat import ChatState, VisionChat
from ..runtime.generation import SamplingOptions, TurnStats
from ..system import release_free_memory
from .store import StateStore, common, message_keys

log = logging.getLogger("acestep_gguf.server")
MAX_REMEMBERED_REPLIES = 512


@dataclass
class Result:
    """What a request produced (its text and the turn's stats), and its way to give up."""

    text: str = ""
    stats: TurnStats = field(default_factory=TurnStats)
    abandoned: threading.Event = field(default_factory=threading.Event)
    withdraw: object = None  # set by the engine while the request waits for a slot

    def abandon(self) -> None:
        """The client went away: stop this request's generation, or leave the line at once."""
        self.abandoned.set()
        if self.withdraw is not None:
            self.withdraw()


@dataclass(eq=False)
class _Ticket:
    """A request between the event loop and the scheduler thread."""

    messages: list[dict]
    sampling: dict
    result: Result
    post: object  # post(kind, value): hands an item to the request's coroutine, thread-safe
    keys: tuple = ()


@dataclass
class _Slot:
    """What one sequence of the context holds: the conversation's message keys and messages."""

    keys: tuple = ()
    messages: list = field(default_factory=list)
    used: int = 0  # when it last finished a turn (the engine's request count): ties go to the oldest


class Engine:
    def __init__(self, chat: VisionChat, store: StateStore, name: str):
        self.chat, self.store, self.name = chat, store, name
        self.replies: OrderedDict[str, list[int]] = OrderedDict()
        self.slots = [_Slot() for _ in range(chat.parallel)]
        self.requests = 0  # served (a turn was started for them)
        self.waiting = 0  # waiting for a slot now
        self.dropped = 0  # given up by their clients before their turn came
        self.busy = 0  # slots generating now (/stats slots_busy)
        self.counters = BatchCounters()  # decoding steps and the tokens they decoded (/stats)
        self.stopping = False  # the server is shutting down: no new turns, the running ones cancelled
        self._queue: collections.deque[_Ticket] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- on the event loop ------------------------------------------------------------------------
    def prepare(self, messages: list[dict], max_decoded_bytes: int | None = None) -> list[dict]:
        """Decode and check every image now (errors before any response is started). Worker thread."""
        out = []
        for m in messages:
            content = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            parts = [{"type": "image", "image": self.chat.prepare_image(p["image"], max_decoded_bytes)}
                     if p["type"] == "image" else p for p in content]
            out.append({"role": m["role"], "content": parts})
        if any(p["type"] == "image" for m in out for p in m["content"]):
            release_free_memory()  # the decoded pixels are gone; give their pages back
        return out

    async def generate(self, messages: list[dict], sampling: dict, result: Result):
        """Yield the reply's pieces. The request waits in line for a slot; leaving (the task
        cancelled, the generator closed) gives the slot up at the scheduler's next step."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def post(kind, value=None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the loop has closed: the server is stopping, nobody waits
                pass

        self._start_thread()
        ticket = _Ticket(messages, sampling, result, post)
        result.withdraw = lambda: self._withdraw(ticket)
        with self._wake:
            self.waiting += 1
            self._queue.append(ticket)
            self._wake.notify()
        finished = False
        try:
            while True:
                kind, value = await queue.get()
                if kind == "piece":
                    yield value
                elif kind == "error":
                    finished = True
                    raise value
                else:
                    finished = True
                    break
        finally:
            if not finished:  # the client went away (or the server stops): stop generating
                result.abandon()

    def shutdown(self) -> None:
        """The server is stopping (SIGTERM / SIGINT): running turns are cancelled, so their streams
        end with a proper final chunk, and waiting requests end at once. Safe from a signal handler."""
        self.stopping = True
        self.chat.cancel()
        self._notify()

    def close(self) -> None:
        """Stop the scheduler, keep the conversations the slots hold for the next start, free the model."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self.chat.cancel()
            self._thread.join()
        try:
            for slot, held in enumerate(self.slots):
                if held.keys:
                    self.store.put(held.keys, ChatState(held.messages, self._batcher.slots[slot].snapshot()))
        finally:
            self.chat.close()

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def _withdraw(self, ticket: _Ticket) -> None:
        """A waiting request's client went away: out of the line now, counted as dropped."""
        with self._wake:
            if ticket not in self._queue:
                return
            self._queue.remove(ticket)
            self.waiting -= 1
            self.dropped += 1
        ticket.post("done")

    def _start_thread(self) -> None:
        if self._thread is None:
            self.chat._acquire()  # the scheduler thread owns the session from now on
            self._batcher = Batcher(self.chat, self.counters)
            self._thread = threading.Thread(target=self._schedule, name="acestep-slots", daemon=True)
            self._thread.start()

    # -- in the scheduler thread ------------------------------------------------------------------
    def _schedule(self) -> None:
        batcher = self._batcher
        running: dict[int, _Ticket] = {}
        while True:
            with self._wake:
                while not self._closing and not running and not self._queue:
                    self._wake.wait()
                if self._closing:
                    break
                starting = []
                while self._queue and len(running) + len(starting) < len(self.slots):
                    ticket = self._queue.popleft()
                    self.waiting -= 1
                    starting.append(ticket)
            for ticket in starting:
                ticket.result.withdraw = None
                self._begin(batcher, ticket, running)
                self.busy = len(running)
            if running:  # a client that left (its job's cancel event) leaves at this step, the others go on
                try:
                    ended = batcher.step()
                except BaseException as e:  # a defect: the running requests fail, the server goes on
                    log.exception("a decoding step failed")
                    for job in batcher.cancel_all():
                        running.pop(job.slot).post("error", e)
                    ended = []
                for job in ended:
                    self._complete(job, running.pop(job.slot))
            self.busy = len(running)
        for job in batcher.cancel_all():
            self._complete(job, running.pop(job.slot))
        with self._wake:
            left, self._queue = list(self._queue), collections.deque()
        for ticket in left:
            ticket.result.stats.finish_reason = "cancelled"
            ticket.post("done")
        self.chat._release()

    def _begin(self, batcher: Batcher, ticket: _Ticket, running: dict) -> None:
        """Start one request on a free slot (or end it at once: dropped, shutting down, an error)."""
        result = ticket.result
        if result.abandoned.is_set():
            self.dropped += 1
            ticket.post("done")
            return
        if self.stopping:  # its turn came during shutdown: it ends now, answered, without generating
            result.stats.finish_reason = "cancelled"
            ticket.post("done")
            return
        self.requests += 1
        try:
            job = self._job(ticket)
            slot = self._place(batcher, ticket.keys)
        except AcestepGGUFError as e:
            ticket.post("error", e)
            return
        except BaseException as e:  # a defect: this request fails, the server goes on
            log.exception("request %d failed", self.requests)
            ticket.post("error", e)
            return
        if batcher.start(job, slot):
            running[slot] = ticket
        else:
            self._complete(job, ticket)

    def _job(self, ticket: _Ticket) -> Job:
        messages = ticket.messages
        for m in messages:  # a reply we generated comes back as text: give it back its token ids
            if m["role"] == "assistant":
                text = "".join(p.get("text", "") for p in m["content"])
                if text in self.replies:
                    m["tokens"] = self.replies[text]
        ticket.keys = message_keys(messages)
        converted = [self.chat._message(m, i) for i, m in enumerate(messages)]
        if not converted or converted[-1]["role"] != "user":
            raise OptionError("the conversation must end with a user message")
        options = SamplingOptions.from_kwargs(self.chat._seed, **ticket.sampling)
        return Job(converted, options, lambda piece: ticket.post("piece", piece), cancel=ticket.result.abandoned)

    def _place(self, batcher: Batcher, keys: tuple) -> int:
        """The free slot for a conversation: the one holding its longest prefix, or a saved state
        restored into one (its own conversation saved first) when the store has a longer one."""
        free = batcher.free
        held = {s: common(self.slots[s].keys, keys) for s in free}
        # ties: an empty slot, else the one used longest ago (its conversation is the likeliest to be over)
        slot = max(free, key=lambda s: (held[s], not self.slots[s].keys, -self.slots[s].used))
        found = self.store.best(keys, better_than=held[slot])
        if found is not None:  # into the slot whose conversation is worth least here, by the same ties
            slot = min(free, key=lambda s: (held[s], bool(self.slots[s].keys), self.slots[s].used))
        current = self.slots[slot]
        if current.keys and common(current.keys, keys) < len(current.keys):
            # this request does not continue the conversation the slot holds: keep that one first
            self.store.put(current.keys, ChatState(current.messages, batcher.slots[slot].snapshot()))
        if found is not None:
            if batcher.slots[slot].restore(found[1].kv):
                log.info("restored a saved conversation state into slot %d (%d cached positions)", slot,
                         found[1].kv.n_past)
            else:  # llama.cpp refused it: never offered again
                log.warning("llama.cpp refused a saved conversation state; dropped it")
                self.store.drop(found[0])
        self.slots[slot] = _Slot()  # until this turn ends well, the slot holds no known conversation
        return slot

    def _complete(self, job: Job, ticket: _Ticket) -> None:
        result = ticket.result
        result.text, result.stats = job.text, job.stats
        if job.error is not None:
            ticket.post("error", job.error)
            return
        if job.tokens is not None:
            self.replies[result.text] = job.tokens
            self.replies.move_to_end(result.text)
            while len(self.replies) > MAX_REMEMBERED_REPLIES:
                self.replies.popitem(last=False)
        reply = {"role": "assistant", "content": [{"type": "text", "text": result.text}]}
        # a turn cancelled before its first token may have left the slot's cache as it was: unknown
        kept = result.stats.finish_reason != "cancelled" or result.stats.completion_tokens > 0
        if kept:
            stored = {**reply, "tokens": list(job.tokens) if job.tokens is not None else None}
            self.slots[job.slot] = _Slot(ticket.keys + message_keys([reply]), job.messages + [stored], self.requests)
        t = result.stats
        log.info("request on slot %d: %d prompt positions, %d from the cache, %d images encoded, %d tokens (%s)",
                 job.slot, t.prompt_positions, t.reused_positions, t.images_encoded, t.completion_tokens,
                 t.finish_reason)
        ticket.post("done")
