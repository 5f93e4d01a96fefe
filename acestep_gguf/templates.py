"""Chat templates are untrusted input: they are only ever rendered here, in Jinja's immutable sandbox,
with a budget. The sandbox stops attribute tricks; the budget stops the rest: every Python line run
while rendering counts (so nested loops end), rendering has a deadline, and operators that build
big values (``'x' * n``, ``a + b``, ``n ** m``, ``s.center(n)``) are refused past a size cap."""

from __future__ import annotations

import sys
import time

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

MEDIA_MARKER = "<__media__>"  # mtmd's default marker: where each image goes in the rendered prompt
MAX_STEPS = 2_000_000  # Python lines executed while rendering; a real template needs thousands
MAX_SECONDS = 5.0
MAX_CHARS = 16 << 20  # of any value built by an operator, and of the rendered text


class TemplateFailed(Exception):
    """A template could not render: its own error, or past the budget. One line; callers wrap it."""


class _OverBudget(BaseException):
    """Raised from the trace function; BaseException so that no `except Exception` inside Jinja or a
    filter can swallow it."""


def _size(value) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**", "+"])

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise TemplateFailed(f"exponent {right} is too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int) and _size(seq) * n > MAX_CHARS:
                    raise TemplateFailed(f"repeating a value {n} times is over the {MAX_CHARS}-character cap")
        if operator == "+" and _size(left) + _size(right) > MAX_CHARS:
            raise TemplateFailed(f"a value over the {MAX_CHARS}-character cap")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CHARS:
                raise TemplateFailed(f"argument {value} is over the {MAX_CHARS} cap")
        return super().call(__context, __obj, *args, **kwargs)


def sandbox() -> ImmutableSandboxedEnvironment:
    """The Jinja environment every template is compiled in (llama-cpp-python's settings)."""
    env = _BudgetedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env


def compile_template(source: str) -> jinja2.Template:
    try:
        return sandbox().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateFailed(f"syntax error on line {e.lineno}: {e.message}") from None
    except RecursionError:
        raise TemplateFailed("nested too deeply to compile") from None


class _Budget:
    def __init__(self):
        self.steps = 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def trace(self, frame, event, arg):
        self.steps += 1
        if self.steps & 0xFFF == 0:
            if self.steps > MAX_STEPS:
                raise _OverBudget(f"took more than {MAX_STEPS} steps (a loop that does not end?)")
            if time.monotonic() > self.deadline:
                raise _OverBudget(f"took more than {MAX_SECONDS:g} s")
        return self.trace


def render(template: jinja2.Template, **context) -> str:
    """Render with the budget on this thread; every failure is one TemplateFailed line."""
    budget, previous = _Budget(), sys.gettrace()
    sys.settrace(budget.trace)
    try:
        text = template.render(**context)
    except _OverBudget as e:
        raise TemplateFailed(str(e)) from None
    except TemplateFailed:
        raise
    except RecursionError:
        raise TemplateFailed("recursion too deep") from None
    except MemoryError:
        raise TemplateFailed("ran out of memory") from None
    except Exception as e:  # the template's own raise_exception, an undefined name, a type error...
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TemplateFailed(message) from None
    finally:
        sys.settrace(previous)
    if len(text) > MAX_CHARS:
        raise TemplateFailed(f"rendered {len(text)} characters, over the {MAX_CHARS} cap")
    return text


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


_QUESTION = "acestep-gguf probe question"
_ANSWER = "acestep-gguf probe answer"
_FOLLOW_UP = "acestep-gguf probe follow-up"
_SYSTEM = "acestep-gguf probe system"
# The conversations a template must render, as the runtime passes them (content as a list of parts,
# images as the media marker): what works when converting then works when chatting.
PROBES = {
    "an image message": [{"role": "user", "content": [_text(MEDIA_MARKER), _text(_QUESTION)]}],
    "a multi-turn conversation": [
        {"role": "user", "content": [_text(MEDIA_MARKER), _text(_QUESTION)]},
        {"role": "assistant", "content": [_text(_ANSWER)]},
        {"role": "user", "content": [_text(_FOLLOW_UP)]}],
    "a system message": [
        {"role": "system", "content": [_text(_SYSTEM)]},
        {"role": "user", "content": [_text(MEDIA_MARKER), _text(_QUESTION)]}],
}


def probe(template: jinja2.Template, which: str, bos_token: str = "<s>", eos_token: str = "</s>") -> None:
    """Render one probe conversation; TemplateFailed says what went wrong."""
    messages = PROBES[which]
    text = render(template, messages=messages, add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token)
    wanted = [p["text"] for m in messages for p in m["content"]]
    at = 0
    for piece in wanted:  # every part, in order: images are markers placed where they appear
        found = text.find(piece, at)
        if found < 0:
            raise TemplateFailed(f"{which} renders without {piece!r} (in order)")
        at = found + len(piece)
    if "'type'" in text:
        raise TemplateFailed(f"{which} renders the message parts as Python objects")
