"""Route llama.cpp's (and mtmd's) C-level log lines through Python: hidden unless verbose,
kept for error messages, and readable by progress callbacks."""

from __future__ import annotations

import ctypes
import sys
import threading
from contextlib import contextmanager
from typing import Callable

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd_cpp

_lock = threading.Lock()
_state = {"verbose": False, "listeners": [], "tail": []}


@llama_cpp.llama_log_callback
def _callback(level: int, text: bytes, user_data) -> None:
    # Called from C: an exception here would be printed and lost, so none may leave.
    try:
        line = text.decode("utf-8", errors="replace")
        tail = _state["tail"]
        tail.append(line)
        del tail[:-50]
        for listener in list(_state["listeners"]):
            listener(line)
        if _state["verbose"]:
            sys.stderr.write(line)
    except BaseException:
        pass


def mute() -> None:
    """Stop echoing llama.cpp's log (a quantizer left running after Ctrl-C must not write after the
    "interrupted" line); it is still kept for error messages."""
    _state["verbose"] = False


def install(verbose: bool = False) -> None:
    """Take over llama.cpp's log output for this process (idempotent)."""
    _state["verbose"] = verbose
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_log_set(_callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_callback, ctypes.c_void_p(0))


def recent(n: int = 5) -> str:
    """The last log lines that look like errors, for an exception message."""
    lines = [ln.strip() for ln in _state["tail"] if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
    return " | ".join((errors or lines)[-n:])


@contextmanager
def listening(listener: Callable[[str], None], verbose: bool = False):
    """Call ``listener`` with every log line while the block runs."""
    with _lock:
        install(verbose)
        _state["listeners"].append(listener)
    try:
        yield
    finally:
        with _lock:
            _state["listeners"].remove(listener)
