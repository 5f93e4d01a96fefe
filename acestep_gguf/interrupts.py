"""One way to handle Ctrl-C around every long call into llama.cpp (quantize, load, encode, decode).

Python delivers SIGINT by raising KeyboardInterrupt in the main thread at the next bytecode, which
may be inside a ctypes callback (llama.cpp's log or abort callback): there the exception is printed
as "Exception ignored" and lost. Inside ``deferred()`` a SIGINT only sets a flag and runs the cancel
hooks (which make llama.cpp's abort callback return true); the KeyboardInterrupt is raised later by
``check()`` or when the block ends, always in plain Python code. Outside the main thread, or when
the host application installed its own SIGINT handler, nothing is changed."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable

_state = {"depth": 0, "hit": False, "previous": None, "hooks": []}
_lock = threading.RLock()


def _handler(signum, frame) -> None:
    _state["hit"] = True
    for hook in list(_state["hooks"]):
        try:
            hook()
        except Exception:  # a hook must never turn the signal into an exception
            pass


def pending() -> bool:
    """A SIGINT arrived inside the current deferred() block."""
    return _state["hit"]


def check() -> None:
    """Raise the deferred KeyboardInterrupt now, at a safe point."""
    if _state["hit"]:
        _state["hit"] = False
        raise KeyboardInterrupt


@contextmanager
def deferred(on_interrupt: Callable[[], None] | None = None):
    """Defer SIGINT for the block; ``on_interrupt`` runs (from the signal handler) when one arrives."""
    owner = threading.current_thread() is threading.main_thread()
    with _lock:
        if owner and _state["depth"] == 0:
            current = signal.getsignal(signal.SIGINT)
            if current is signal.default_int_handler:
                _state["previous"] = current
                _state["hit"] = False
                signal.signal(signal.SIGINT, _handler)
        if owner:
            _state["depth"] += 1
        if on_interrupt is not None:
            _state["hooks"].append(on_interrupt)
    raised = False
    try:
        yield
    except BaseException:
        raised = True
        raise
    finally:
        with _lock:
            if on_interrupt is not None:
                _state["hooks"].remove(on_interrupt)
            if owner:
                _state["depth"] -= 1
                if _state["depth"] == 0 and _state["previous"] is not None:
                    signal.signal(signal.SIGINT, _state["previous"])
                    _state["previous"] = None
                    if _state["hit"] and not raised:
                        _state["hit"] = False
                        raise KeyboardInterrupt
