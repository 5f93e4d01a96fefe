"""The stop-string release rule, on its own: what may be shown while a stop string could still be
forming, and where the reply is cut once it appears."""

from __future__ import annotations

import pytest

from acestep_gguf.runtime.generation import release


@pytest.mark.parametrize("text,sent,stops,expected", [
    ("Hello world", 0, [], ("Hello world", False)),
    ("Hello wor", 0, ["world"], ("Hello ", False)),  # "wor" may become "world": held back
    ("Hello world", 6, ["world"], ("", True)),  # the stop string itself is never shown
    ("Hello world and more", 0, ["world"], ("Hello ", True)),
    ("abcEN", 0, ["END", "ENOUGH"], ("abc", False)),  # the longest possible prefix of any stop is held
    ("abcENx", 3, ["END"], ("ENx", False)),  # a false start is released once it cannot match
    ("stop at <|end|>", 5, ["<|end|>", "at"], ("", True)),
    ("x</s", 1, ["</s>"], ("", False)),
])
def test_release(text, sent, stops, expected):
    assert release(text, sent, stops) == expected


def test_a_stop_string_spanning_two_releases():
    shown, sent = "", 0
    for text in ("The answer", "The answer is 4", "The answer is 4.\nUSER", "The answer is 4.\nUSER: next"):
        out, hit = release(text, sent, ["\nUSER:"])
        shown += out
        sent += len(out)
        if hit:
            break
    assert (shown, hit) == ("The answer is 4.", True)
