"""VisionChat inside a host application: one lock, cancel in every phase, close() during a generation,
contexts freed on every path, options checked. The `endless` model never stops by itself, so every
cancel here lands mid-generation."""

from __future__ import annotations

import gc
import threading

import pytest

from acestep_gguf import BusyError, ModelFilesError, OptionError, VisionChat
from acestep_gguf.runtime import chat as chat_module


@pytest.fixture()
def session(endless):
    with VisionChat.load(endless, n_ctx=4096) as s:
        yield s


def test_the_endless_model_really_runs_to_the_token_limit(session):
    assert len(session.ask("Hello", max_tokens=40)) > 0
    assert session.last_turn.finish_reason == "length" and session.last_turn.completion_tokens == 40


def test_cancel_between_stream_and_the_first_next_is_honoured(session, noise_image):
    stream = session.stream("Describe this image.", images=[noise_image], max_tokens=500)
    session.cancel()
    assert list(stream) == []
    assert session.last_turn.finish_reason == "cancelled" and session.last_turn.images_encoded == 0
    assert session.messages == []  # the cancelled message did not enter the conversation
    session.ask("Hi", max_tokens=3)
    assert (session.last_turn.completion_tokens, session.last_turn.finish_reason) == (3, "length")


def test_cancel_from_another_thread_during_decoding(session, noise_image):
    pieces = []
    for piece in session.stream("Describe this image.", images=[noise_image], max_tokens=3000):
        pieces.append(piece)
        if len(pieces) == 3:
            threading.Thread(target=session.cancel).start()
    t = session.last_turn
    assert t.finish_reason == "cancelled" and 3 <= t.completion_tokens < 3000
    assert session.messages[-1]["content"][0]["text"] == "".join(pieces)


def test_close_from_another_thread_during_a_generation(endless, noise_image):
    chat = VisionChat.load(endless, n_ctx=4096)
    started, pieces, errors = threading.Event(), [], []

    def generate():
        try:
            for piece in chat.stream("Describe this image.", images=[noise_image], max_tokens=3500):
                pieces.append(piece)
                started.set()
        except Exception as e:  # noqa: BLE001 - the test asserts there is none
            errors.append(e)
        started.set()

    worker = threading.Thread(target=generate)
    worker.start()
    assert started.wait(60)
    chat.close()  # cancels, waits for the generation to stop, frees the contexts
    worker.join(60)
    assert not worker.is_alive() and errors == []
    assert chat.last_turn.finish_reason == "cancelled" and chat.last_turn.completion_tokens < 3500
    with pytest.raises(ModelFilesError, match="closed"):
        chat.ask("Still there?")
    chat.close()  # twice is fine


def test_close_while_a_stream_is_paused_in_the_same_thread(endless):
    chat = VisionChat.load(endless, n_ctx=1024)
    stream = chat.stream("Hello", max_tokens=500)
    first = next(stream)
    chat.close()
    assert isinstance(first, str) and list(stream) == []
    assert chat.last_turn.finish_reason == "cancelled"


def test_one_lock_for_everything(session, noise_image):
    stream = session.stream("Hello", max_tokens=50)  # busy from here, before the first next()
    with pytest.raises(BusyError):
        session.stream("Second?")
    with pytest.raises(BusyError):
        session.reset()
    with pytest.raises(BusyError):
        session.encode_image(noise_image)
    with pytest.raises(BusyError):
        session.next_token_logprobs("Hi")
    stream.close()
    session.reset()
    assert session.encode_image(noise_image).shape == (16, 64)


def test_dropping_an_unstarted_stream_frees_the_session(session):
    session.stream("Hello", max_tokens=5)  # never iterated, dropped at once
    gc.collect()
    session.ask("Hi", max_tokens=2)
    assert (session.last_turn.completion_tokens, session.last_turn.finish_reason) == (2, "length")


def test_images_none_and_a_single_image(session, noise_image):
    session.ask("Hi", images=None, max_tokens=2)
    assert session.last_turn.completion_tokens == 2 and session.last_turn.images_encoded == 0
    session.reset()
    session.ask("What is this?", images=noise_image, max_tokens=2)
    assert session.last_turn.images_encoded == 1


@pytest.mark.parametrize("options,needle", [
    ({"max_tokens": 0}, "max_tokens 0"), ({"temperature": -1}, "temperature -1"), ({"top_p": 0}, "top_p 0"),
    ({"seed": -3}, "seed -3"), ({"stop": [""]}, "stop"), ({"max_token": 5}, "unknown sampling option 'max_token'"),
])
def test_bad_sampling_options_are_one_line(session, options, needle):
    with pytest.raises(OptionError, match=needle):
        session.ask("Hi", **options)


@pytest.mark.parametrize("kwargs,needle", [
    ({"n_ctx": 10}, "one image takes 16 positions"), ({"n_ctx": "big"}, "n_ctx 'big'"),
    ({"n_gpu_layers": "many"}, "n_gpu_layers 'many'"), ({"n_gpu_layers": -1}, "n_gpu_layers -1"),
    ({"n_threads": 0}, "n_threads 0"), ({"vram": "12"}, "give a size with a unit"),
])
def test_bad_load_options_are_one_line(endless, kwargs, needle):
    with pytest.raises(OptionError, match=needle):
        VisionChat.load(endless, **kwargs)


def test_contexts_are_freed_when_load_fails_half_way(endless, monkeypatch):
    freed = []
    real_free = chat_module._Contexts.free

    def spy(self):
        freed.append((self.llm is not None, self.mctx is not None))
        real_free(self)

    def broken_init(self, *args, **kwargs):
        raise ModelFilesError("failed after the contexts were made")

    monkeypatch.setattr(chat_module._Contexts, "free", spy)
    monkeypatch.setattr(VisionChat, "__init__", broken_init)
    with pytest.raises(ModelFilesError, match="failed after"):
        VisionChat.load(endless, n_ctx=1024)
    assert freed == [(True, True)]  # both the llama and the mtmd context were made, and both freed


def test_a_forgotten_session_is_freed_by_its_finalizer(endless, monkeypatch):
    freed = []
    real_free = chat_module._Contexts.free
    monkeypatch.setattr(chat_module._Contexts, "free", lambda self: (freed.append(self.llm is not None), real_free(self)))
    chat = VisionChat.load(endless, n_ctx=1024)
    chat.ask("Hi", max_tokens=2)
    del chat
    gc.collect()
    assert freed == [True]


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.005, 0.02, 0.08])
def test_a_cancel_in_any_phase_ends_the_turn_cleanly(session, noise_image, second_image, delay):
    """A long prompt with two images: depending on the delay the cancel lands in rendering, prefill,
    image encoding or decoding. Whichever it is, the turn ends as cancelled and nothing private escapes."""
    session.reset()
    timer = threading.Timer(delay, session.cancel)
    stream = session.stream("word " * 700, images=[noise_image, second_image], max_tokens=100000)
    timer.start()
    pieces = list(stream)
    timer.join()
    t = session.last_turn
    assert t.finish_reason == "cancelled" and t.completion_tokens < 100000
    # cancelled in prefill: the message is not kept and nothing was said; later: the partial reply is kept
    kept = session.messages[-1]["content"][0]["text"] if session.messages else ""
    assert "".join(pieces) == kept and len(session.messages) in (0, 2)
    session.ask("Still fine?", max_tokens=2)  # the session goes on, whichever phase the cancel hit
    assert (session.last_turn.completion_tokens, session.last_turn.finish_reason) == (2, "length")
