"""Generation: sampling options, what a turn cost, the stop-string release rule (pure), and the
sampling loop over a KV session."""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, fields
from typing import Iterator, Sequence

from ..errors import OptionError


@dataclass
class TurnStats:
    """What the last turn cost; tests and benchmarks read this instead of timing."""

    prompt_positions: int = 0  # positions the conversation occupies once the prompt is in the cache
    reused_positions: int = 0  # of those, already in the cache from earlier turns
    evaluated_positions: int = 0  # newly evaluated this turn (text tokens + image positions)
    images_encoded: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""  # stop, length, context, cancelled
    stop_string_hit: bool = False  # the reply was cut at a stop string (its text no longer matches its tokens)
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.completion_tokens - 1) / self.decode_s if self.completion_tokens > 1 and self.decode_s else 0.0


@dataclass
class SamplingOptions:
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 0.95
    seed: int | None = None
    stop: Sequence[str] = ()
    grammar: str | None = None  # GBNF (llama.cpp's grammar format): the reply must match it

    @classmethod
    def from_kwargs(cls, default_seed: int | None, **kwargs) -> "SamplingOptions":
        """Checked options: unknown names and out-of-range values are one-line errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise OptionError(f"unknown sampling option {unknown[0]!r} (known: {', '.join(sorted(known))})")
        o = cls(**{k: v for k, v in kwargs.items() if v is not None})
        if o.seed is None:
            o.seed = default_seed
        if type(o.max_tokens) is not int or o.max_tokens < 1:
            raise OptionError(f"max_tokens {o.max_tokens!r}: a whole number of at least 1")
        if not isinstance(o.temperature, (int, float)) or not 0 <= o.temperature <= 100:
            raise OptionError(f"temperature {o.temperature!r}: a number from 0 (greedy) to 100")
        if not isinstance(o.top_p, (int, float)) or not 0 < o.top_p <= 1:
            raise OptionError(f"top_p {o.top_p!r}: a number in (0, 1]")
        if o.seed is not None and (type(o.seed) is not int or not 0 <= o.seed < 1 << 32):
            raise OptionError(f"seed {o.seed!r}: a whole number from 0 to 2**32-1")
        if isinstance(o.stop, str):
            o.stop = [o.stop]
        if not all(isinstance(s, str) and s for s in o.stop):
            raise OptionError("stop: a list of non-empty strings")
        if o.grammar is not None and not (isinstance(o.grammar, str) and o.grammar.strip()):
            raise OptionError("grammar: a GBNF grammar text")
        return o


def release(text: str, sent: int, stops: Sequence[str]) -> tuple[str, bool]:
    """The text safe to yield now: up to a stop string if one appeared, else all but a possible stop prefix."""
    found = [at for stop in stops if (at := text.find(stop, max(0, sent - len(stop)))) >= 0]
    if found:  # the earliest stop string wins, whatever order they were given in
        return text[sent:max(sent, min(found))], True
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return text[sent:len(text) - hold], False


def make_sampler(o: SamplingOptions, vocab):
    """llama.cpp's sampler chain for these options: the grammar first (if any), then greedy at
    temperature 0, else top-p, temperature, seed."""
    import llama_cpp
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if o.grammar:
        grammar = llama_cpp.llama_sampler_init_grammar(vocab, o.grammar.encode(), b"root")
        if not grammar:
            llama_cpp.llama_sampler_free(chain)
            raise OptionError("grammar: llama.cpp could not parse it")
        llama_cpp.llama_sampler_chain_add(chain, grammar)
    if o.temperature <= 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    else:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(o.top_p, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(o.temperature))
        seed = llama_cpp.LLAMA_DEFAULT_SEED if o.seed is None else o.seed
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


class Decoding:
    """One sequence's sampling, one token at a time: the sampler chain, stop strings, UTF-8 and the
    turn's stats. Its owner decodes ``token`` after every ``step()`` that did not finish — alone
    (generate below) or together with other sequences (runtime/batch.py): both run this same code."""

    def __init__(self, kv, o: SamplingOptions, stats: TurnStats, started: float, generated: list[int]):
        import llama_cpp
        self.llama = llama_cpp  # imported here, as this module is also read by the light API modules
        self.kv, self.o, self.stats, self.started, self.generated = kv, o, stats, started, generated
        self.sampler = make_sampler(o, kv.vocab)
        self.decoder = codecs.getincrementaldecoder("utf-8")("ignore")  # as llama-cpp-python does
        self.text, self.sent, self.stop_hit, self.t_first = "", 0, False, None
        self.token = -1

    def step(self, index: int = -1) -> tuple[str, bool]:
        """Sample the next token from the logits of row ``index`` of the last batch: (text safe to
        show now, finished). ``stats.finish_reason`` says why it finished."""
        llama_cpp, stats, o = self.llama, self.stats, self.o
        if self.kv.cancel.is_set():
            stats.finish_reason = "cancelled"
            return "", True
        if stats.completion_tokens >= o.max_tokens:
            stats.finish_reason = "length"
            return "", True
        token = llama_cpp.llama_sampler_sample(self.sampler, self.kv.llm.ctx, index)
        if self.t_first is None:
            self.t_first = time.perf_counter()
            stats.time_to_first_token_s = self.t_first - self.started
        if llama_cpp.llama_vocab_is_eog(self.kv.vocab, token):
            stats.finish_reason = "stop"
            return "", True
        stats.completion_tokens += 1
        self.generated.append(token)
        self.token = token
        self.text += self.decoder.decode(self.kv.piece(token))
        out, self.stop_hit = release(self.text, self.sent, o.stop)
        self.sent += len(out)
        if self.stop_hit:
            stats.finish_reason, stats.stop_string_hit = "stop", True
            return out, True
        if self.kv.n_past + 1 >= self.kv.n_ctx:
            stats.finish_reason = "context"
            return out, True
        return out, False

    def tail(self) -> str:
        """What is left to show once finished: a held-back partial stop string that never completed."""
        self.text += self.decoder.decode(b"", final=True)
        return "" if self.stop_hit else self.text[self.sent:]

    def close(self) -> None:
        if self.sampler is not None:
            self.llama.llama_sampler_free(self.sampler)
            self.sampler = None
        if self.t_first is not None:
            self.stats.decode_s = time.perf_counter() - self.t_first


def generate(kv, o: SamplingOptions, stats: TurnStats, started: float, generated: list[int]) -> Iterator[str]:
    """Sample after the prompt the KV session holds, yielding text as soon as it is safe to show (no
    half UTF-8 character, no possible start of a stop string). Every sampled token is appended to
    ``generated``; ``stats.finish_reason`` says why it ended (stop, length, context, cancelled)."""
    from .kv_session import Cancelled
    decoding = Decoding(kv, o, stats, started, generated)
    try:
        while True:
            out, finished = decoding.step()
            if out:
                yield out
            if finished:
                break
            try:
                kv.decode_token(decoding.token)
            except Cancelled:
                stats.finish_reason = "cancelled"
                break
        if tail := decoding.tail():
            yield tail
    except GeneratorExit:
        stats.finish_reason = stats.finish_reason or "cancelled"  # closed by the caller before the end
        raise
    except Exception:
        stats.finish_reason = "error"
        raise
    finally:
        decoding.close()
