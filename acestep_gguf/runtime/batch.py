"""Several conversations decoded together: one ``llama_decode`` per step for every active sequence.

Decoding one token reads all the weights once; decoding one token for each of N sequences in the
same call reads them once for all N, so on a memory-bound machine N conversations cost little more
than one (docs/performance.md). The context holds ``parallel`` sequences, each a KVSession of its
own (its spans, its prefix reuse, a picture one span never encoded again). A job — one conversation
to answer — is prefilled alone into a free sequence (text and image embeddings cannot share a
batch, and a prefill is long anyway), its first token sampled at once; from then on it decodes with
the others. A job that finishes frees its sequence at once and the owner can start another there
(continuous batching). Sampling, stop strings, grammars and finish reasons are generation.Decoding,
the same code one conversation uses, so a job's answer does not depend on its neighbours.

Cancelling: each job has its own event, checked before every step (a cancelled job leaves, the
others go on); during a job's prefill llama.cpp's abort callback also watches that job's event.
The session's own cancel event (Ctrl-C, close(), server shutdown) stops every job."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import llama_cpp

from ..errors import AcestepGGUFError
from .generation import Decoding, SamplingOptions, TurnStats
from .kv_session import AbortFlag, Cancelled, TokenBatch, decode_error


@dataclass
class Job:
    """One conversation to answer: ``messages`` as VisionChat keeps them (prepared pictures), the
    last one the user's. ``on_piece`` is called, in the batch's thread, with each piece of the reply."""

    messages: list[dict]
    options: SamplingOptions
    on_piece: Callable[[str], None] = lambda piece: None
    cancel: threading.Event = field(default_factory=threading.Event)
    fresh: bool = False  # start from an empty sequence (captions), not from what it holds
    tag: object = None  # the owner's: which request or picture this is
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    stats: TurnStats = field(default_factory=TurnStats)
    error: AcestepGGUFError | None = None
    slot: int = -1
    done: bool = False


@dataclass
class BatchCounters:
    """What decoding together achieved: tests and benchmarks read these instead of timing."""

    steps: int = 0  # llama_decode calls of generated tokens
    rows: int = 0  # tokens they decoded (rows / steps: the mean number of sequences per call)
    widest: int = 0  # the most sequences one call decoded

    @property
    def mean_width(self) -> float:
        return self.rows / self.steps if self.steps else 0.0


class Batcher:
    """The sequences of one VisionChat's context and the jobs on them. Not thread-safe: one thread
    (the owner of the chat's session lock) calls start() and step()."""

    def __init__(self, chat, counters: BatchCounters | None = None):
        self.chat = chat
        self.slots = [chat._kv] + [chat._kv.sibling(seq) for seq in range(1, chat.parallel)]
        self.jobs: list[Job | None] = [None] * len(self.slots)
        self._decodings: list[Decoding | None] = [None] * len(self.slots)
        self._batch = TokenBatch(len(self.slots))
        self.counters = counters or BatchCounters()

    @property
    def free(self) -> list[int]:
        return [i for i, job in enumerate(self.jobs) if job is None]

    @property
    def active(self) -> int:
        return sum(job is not None for job in self.jobs)

    def start(self, job: Job, slot: int) -> bool:
        """Prefill ``job`` into the free sequence ``slot`` and sample its first token; False when it
        finished already (an error, cancelled, one token long)."""
        assert self.jobs[slot] is None
        kv, chat = self.slots[slot], self.chat
        job.slot, job.stats = slot, TurnStats()
        kv.cancel = AbortFlag(chat._cancel, job.cancel)
        chat._abort.extra = job.cancel
        started = time.perf_counter()
        try:
            if job.fresh:
                kv.clear()
            if job.cancel.is_set():
                raise Cancelled()
            chat._prefill(job.messages, job.stats, kv)
            decoding = Decoding(kv, job.options, job.stats, started, job.tokens)
        except Cancelled:
            job.stats.finish_reason = "cancelled"
            self._end(job)
            return False
        except AcestepGGUFError as e:  # this job's picture or prompt; the other sequences are untouched
            job.error, job.stats.finish_reason = e, "error"
            self._end(job)
            return False
        finally:
            chat._abort.extra = None
        self.jobs[slot], self._decodings[slot] = job, decoding
        return self._advance(slot, -1) is None

    def step(self) -> list[Job]:
        """Decode the last sampled token of every active job in one llama_decode, sample each one's
        next token; the jobs that finished (their sequences are free again)."""
        finished: list[Job] = []
        rows = []
        for slot, job in enumerate(self.jobs):
            if job is not None and job.cancel.is_set():  # left before the step: the others go on
                job.stats.finish_reason = "cancelled"
                finished.append(self._finish(slot))
            elif job is not None:
                rows.append(slot)
        if not rows:
            return finished
        self._batch.fill([(self._decodings[s].token, self.slots[s].n_past, self.slots[s].seq, True) for s in rows])
        status = llama_cpp.llama_decode(self.chat._contexts.llm.ctx, self._batch.batch)
        c = self.counters
        c.steps, c.rows, c.widest = c.steps + 1, c.rows + len(rows), max(c.widest, len(rows))
        if status != 0:
            error = decode_error(status, self.chat._cancel.is_set(), self.slots[0].n_ctx)
            for slot in rows:
                kv = self.slots[slot]
                kv.truncate(len(kv.cache))  # drop whatever part of the batch did land
                job = self.jobs[slot]
                if isinstance(error, Cancelled):
                    job.stats.finish_reason = "cancelled"
                else:
                    job.error, job.stats.finish_reason = error, "error"
                finished.append(self._finish(slot))
            return finished
        for index, slot in enumerate(rows):
            self.slots[slot].appended(self._decodings[slot].token)
            if (ended := self._advance(slot, index)) is not None:
                finished.append(ended)
        return finished

    def cancel_all(self) -> list[Job]:
        """End every active job as cancelled (the session is closing); the jobs ended."""
        ended = []
        for slot, job in enumerate(self.jobs):
            if job is not None:
                job.stats.finish_reason = "cancelled"
                ended.append(self._finish(slot))
        return ended

    # -- per job ----------------------------------------------------------------------------------
    def _advance(self, slot: int, index: int) -> Job | None:
        """Sample the job's next token from row ``index``; the job, ended, when it finished."""
        job, decoding = self.jobs[slot], self._decodings[slot]
        out, finished = decoding.step(index)
        if out:
            self._emit(job, out)
        if not finished:
            return None
        if tail := decoding.tail():
            self._emit(job, tail)
        return self._finish(slot)

    def _emit(self, job: Job, piece: str) -> None:
        job.text += piece
        job.on_piece(piece)

    def _finish(self, slot: int) -> Job:
        job, decoding = self.jobs[slot], self._decodings[slot]
        self.jobs[slot] = self._decodings[slot] = None
        if decoding is not None:
            decoding.close()
        if job.stats.stop_string_hit:
            job.tokens = None  # cut text no longer matches its tokens
        self._end(job)
        return job

    def _end(self, job: Job) -> None:
        job.done = True
        self.slots[job.slot].cancel = self.chat._cancel  # the sequence answers to the session alone again


@dataclass(frozen=True)
class BatchRequest:
    """One independent question for VisionChat.batch(): a prompt and its pictures (before the text)."""

    prompt: str
    images: tuple = ()


@dataclass(frozen=True)
class BatchReply:
    """The answer to request number ``index``; ``error`` (the one-line message) when it failed, and
    then ``text`` is empty. ``stats.finish_reason`` is "cancelled" for one stopped by cancel()."""

    index: int
    text: str
    stats: TurnStats
    error: str | None = None


def answer_all(chat, requests, options: SamplingOptions, base: list[dict], make_message) -> Iterator[BatchReply]:
    """The body of VisionChat.batch (run holding its session lock): up to ``chat.parallel`` requests
    at a time, each a fresh conversation (``base`` + its message), replies in request order. After a
    cancel no new request is started; those never started get no reply."""
    batcher = Batcher(chat)
    chat.last_batch = batcher.counters
    done: dict[int, Job] = {}
    source = enumerate(requests)
    exhausted, next_index = False, 0
    try:
        while True:
            while not exhausted and batcher.free and not chat._cancel.is_set():
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                job = Job([], options, fresh=True, tag=item[0])
                try:
                    job.messages = base + [make_message(item[1])]
                except AcestepGGUFError as e:  # a picture that cannot be read: this request's answer
                    job.error, job.stats.finish_reason, job.done = e, "error", True
                if job.done or not batcher.start(job, batcher.free[0]):
                    done[job.tag] = job
            if not batcher.active:
                if exhausted or chat._cancel.is_set():
                    break
                continue
            for job in batcher.step():
                done[job.tag] = job
            while next_index in done:
                yield _reply(done.pop(next_index))
                next_index += 1
        for index in sorted(done):  # cancelled: what ended, in order, gaps left
            yield _reply(done.pop(index))
    finally:
        batcher.cancel_all()


def _reply(job: Job) -> BatchReply:
    return BatchReply(job.tag, job.text if job.error is None else "", job.stats,
                      None if job.error is None else str(job.error))
