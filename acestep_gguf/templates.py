"""Chat templates are untrusted input: they are only ever rendered here, in Jinja's immutable sandbox,
with a budget. The sandbox stops attribute tricks; the budget stops the rest: every Python line run
while rendering counts (so nested loops end), rendering has a deadline, and operators that build
big values (``'x' * n``, ``a + b``, ``n ** m``, ``s.center(n)``) are refused past a size cap."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

MEDIA_MARKER = "<__media__>"  # mtmd's default marker: where each image goes in the rendered prompt
PLACEHOLDER_KEY = "acestep_gguf.chat_template.image_placeholder"  # GGUF key: what the stored template writes per picture
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


class GenerationTag(Extension):
    """transformers' ``{% generation %}...{% endgeneration %}`` (it marks the assistant's tokens for
    training masks, llava-hf's templates use it): rendered as its body, as transformers renders it."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def sandbox() -> ImmutableSandboxedEnvironment:
    """The Jinja environment every template is compiled in (llama-cpp-python's settings)."""
    env = _BudgetedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", GenerationTag])

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


IMAGE_PART = {"type": "image"}  # how transformers' processors hand a picture to a chat template
_QUESTION = "acestep-gguf probe question"
_ANSWER = "acestep-gguf probe answer"
_FOLLOW_UP = "acestep-gguf probe follow-up"
_SYSTEM = "acestep-gguf probe system"
# The conversations a template must render, as the runtime passes them (content as a list of parts,
# pictures as image parts): what works when converting then works when chatting.
PROBES = {
    "an image message": [{"role": "user", "content": [IMAGE_PART, _text(_QUESTION)]}],
    "a multi-turn conversation": [
        {"role": "user", "content": [IMAGE_PART, _text(_QUESTION)]},
        {"role": "assistant", "content": [_text(_ANSWER)]},
        {"role": "user", "content": [IMAGE_PART, _text(_FOLLOW_UP)]}],
    "a system message": [
        {"role": "system", "content": [_text(_SYSTEM)]},
        {"role": "user", "content": [IMAGE_PART, _text(_QUESTION)]}],
}

# Image placeholders of the templates of GGUF files written elsewhere (llama.cpp's converter keeps
# the checkpoint's template but not its image token): LLaVA, Qwen2-VL, Pixtral, Llama-3.2-Vision, ...
KNOWN_PLACEHOLDERS = ("<image>", "<|image_pad|>", "[IMG]", "<|image|>", "<image_placeholder>")


@dataclass(frozen=True)
class ImageStyle:
    """How a template places pictures. ``parts``: it renders each image part as ``placeholder`` (the
    checkpoint's image token text, as transformers' processors expect) — the runtime replaces that
    with mtmd's marker. Otherwise (legacy): pictures are handed over as text parts holding the marker,
    for templates that only print text parts."""

    parts: bool
    placeholder: str = MEDIA_MARKER
    # a message without pictures is handed over as one string, not a list of text parts (templates that
    # write ``message['content'] + eos_token``, as Pixtral's does for replies)
    text_as_string: bool = False

    def content(self, part: dict) -> dict:
        """What the template sees for one image part."""
        return dict(IMAGE_PART) if self.parts else _text(MEDIA_MARKER)

    def message_content(self, parts: list[dict]):
        """What the template sees as a message's content."""
        if self.text_as_string and all(p["type"] == "text" for p in parts):
            return "".join(p["text"] for p in parts)
        return parts


LEGACY = ImageStyle(parts=False)


def probe(template: jinja2.Template, which: str, style: ImageStyle, bos_token: str = "<s>",
          eos_token: str = "</s>") -> None:
    """Render one probe conversation; TemplateFailed says what went wrong. Every text part must come
    out, in order, and exactly one placeholder per picture, each inside its own message."""
    messages = [{"role": m["role"],
                 "content": style.message_content([style.content(p) if p["type"] == "image" else p for p in m["content"]])}
                for m in PROBES[which]]
    text = render(template, messages=messages, add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token)
    if "'type'" in text:
        raise TemplateFailed(f"{which} renders the message parts as Python objects")
    spans = []  # per message: (start of its first text, end of its last text)
    at = 0
    for m in PROBES[which]:
        first = None
        for piece in (p["text"] for p in m["content"] if p["type"] == "text"):
            found = text.find(piece, at)
            if found < 0:
                raise TemplateFailed(f"{which} renders without {piece!r} (in order)")
            first = found if first is None else first
            at = found + len(piece)
        spans.append((first, at))
    places = [i for i in range(len(text)) if text.startswith(style.placeholder, i)]
    owners = [i for i, m in enumerate(PROBES[which]) for p in m["content"] if p["type"] == "image"]
    if len(places) != len(owners):
        raise TemplateFailed(f"{which} with {len(owners)} image(s) renders {len(places)} {style.placeholder!r}")
    for place, owner in zip(places, owners):
        low = spans[owner - 1][1] if owner else 0
        high = spans[owner + 1][0] if owner + 1 < len(spans) else len(text)
        if not low <= place < high:
            raise TemplateFailed(f"{which} renders an image outside its own message")


def check(template: jinja2.Template, style: ImageStyle, skip: tuple = (), **tokens) -> None:
    """Every probe conversation (but those in ``skip``) renders as ``style`` demands."""
    for which in PROBES:
        if which not in skip:
            probe(template, which, style, **tokens)


def image_style(template: jinja2.Template, placeholders: tuple[str, ...], skip: tuple = (), **tokens) -> ImageStyle:
    """The first style this template renders every probe in: image parts with one of ``placeholders``
    (tried in order; text-only messages as lists of parts, then as strings), else pictures as marker
    text parts. TemplateFailed names the first style's problem."""
    first = None
    styles = [ImageStyle(True, p, as_string) for p in dict.fromkeys(placeholders) for as_string in (False, True)]
    for style in styles + [LEGACY]:
        try:
            check(template, style, skip, **tokens)
            return style
        except TemplateFailed as e:
            first = first or e
    raise first
