"""Rendering a conversation with the GGUF's own template into prompt pieces for the KV session.

Pictures reach the template as image parts (``{"type": "image"}``, as transformers' processors pass
them) and come out as the checkpoint's placeholder (``<image>``, ``<|image_pad|>``, ...), which
becomes mtmd's marker — or, for templates that only print text parts, as a text part holding the
marker (``templates.ImageStyle``). Earlier replies are spliced back as the very tokens that were
generated (a re-tokenisation could differ), so their KV entries are reused as they are.

Message text is data, never markup: a text that holds a control token's text (``<|im_start|>``), the
placeholder or the marker is rendered as a sentinel and put back as a *protected* range, which the
KV session tokenizes without special-token parsing. Everything else is rendered and tokenized as
transformers does (one string, special tokens parsed), so prompts stay exactly the checkpoint's."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import jinja2

from ..errors import ModelFilesError, OptionError
from ..templates import MEDIA_MARKER, ImageStyle, TemplateFailed, render

_SENTINEL = re.compile("\x00(reply|text)([0-9]+)\x00")


@dataclass(frozen=True)
class TextPiece:
    """Prompt text, and the ranges of it that are message text to tokenize without special tokens."""

    text: str
    protected: tuple = ()  # ((start, end), ...)


def render_prompt(template: jinja2.Template, style: ImageStyle, messages: list[dict], bos_token: str, eos_token: str,
                  is_markup: Callable[[str], bool], splice: bool = True) -> list:
    """The prompt as pieces: TextPiece, ("image", PreparedImage) or ("tokens", ids). ``is_markup(text)``
    says whether a message text holds something the tokenizer or mtmd would read as markup."""
    images, replies, texts, rendered = [], [], [], []
    for m in messages:
        content = []
        for part in m["content"]:
            if part["type"] == "image":
                images.append(part["image"])
                content.append(style.content(part))
            elif is_markup(part["text"]) or "\x00" in part["text"]:
                content.append({"type": "text", "text": f"\x00text{len(texts)}\x00"})
                texts.append(part["text"])
            else:
                content.append(part)
        if splice and m["role"] == "assistant" and m.get("tokens") is not None:
            content = [{"type": "text", "text": f"\x00reply{len(replies)}\x00"}]
            replies.append(m["tokens"])
        rendered.append({"role": m["role"], "content": style.message_content(content)})
    try:
        text = render(template, messages=rendered, add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token)
    except TemplateFailed as e:
        raise ModelFilesError(f"the chat template failed on this conversation ({e})") from None
    seen = [(m.group(1), int(m.group(2))) for m in _SENTINEL.finditer(text)]
    if [i for k, i in seen if k == "reply"] != list(range(len(replies))):
        # the template rewrote or dropped replies: fall back to plain re-tokenisation
        return render_prompt(template, style, messages, bos_token, eos_token, is_markup, splice=False)
    if sorted(i for k, i in seen if k == "text") != list(range(len(texts))):
        raise OptionError("the chat template rewrites message text that holds control-token text; remove "
                          f"{MEDIA_MARKER!r}, the image placeholder and special tokens from the message")
    return _pieces(text, style, images, replies, texts)


def _pieces(text: str, style: ImageStyle, images: list, replies: list, texts: list) -> list:
    pieces, parts, protected, length = [], [], [], 0
    queue = list(images)

    def flush():
        nonlocal parts, protected, length
        if parts:
            pieces.append(TextPiece("".join(parts), tuple(protected)))
        parts, protected, length = [], [], 0

    def markup(chunk: str):
        nonlocal length
        if style.parts:
            chunk = chunk.replace(style.placeholder, MEDIA_MARKER)
        for i, between in enumerate(chunk.split(MEDIA_MARKER)):
            if i:
                if not queue:
                    raise ModelFilesError(f"the chat template placed more image markers than the {len(images)} "
                                          "picture(s) of the conversation")
                flush()
                pieces.append(("image", queue.pop(0)))
            if between:
                parts.append(between)
                length += len(between)

    at = 0
    for match in _SENTINEL.finditer(text):
        markup(text[at:match.start()])
        kind, index = match.group(1), int(match.group(2))
        if kind == "reply":
            flush()
            pieces.append(("tokens", replies[index]))
        else:
            protected.append((length, length + len(texts[index])))
            parts.append(texts[index])
            length += len(texts[index])
        at = match.end()
    markup(text[at:])
    flush()
    if queue:
        raise ModelFilesError(f"the chat template placed {len(images) - len(queue)} image markers for {len(images)} "
                              "picture(s)")
    return pieces
