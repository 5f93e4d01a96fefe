"""Rendering a conversation with the GGUF's own template into prompt pieces for the KV session.

Images become the media marker where they appear; earlier replies are spliced back as the very
tokens that were generated (a re-tokenisation could differ), so their KV entries are reused as
they are."""

from __future__ import annotations

import jinja2

from ..errors import ModelFilesError
from ..templates import MEDIA_MARKER, TemplateFailed, render


def render_prompt(template: jinja2.Template, messages: list[dict], bos_token: str, eos_token: str,
                  splice: bool = True) -> list:
    """The prompt as pieces: ("text", str, images) or ("tokens", ids)."""
    images, replies, rendered = [], [], []
    for m in messages:
        content = []
        for part in m["content"]:
            if part["type"] == "image":
                images.append(part["image"])
                content.append({"type": "text", "text": MEDIA_MARKER})
            else:
                content.append(part)
        if splice and m["role"] == "assistant" and m.get("tokens") is not None:
            mark = f"\x00reply{len(replies)}\x00"
            replies.append((mark, m["tokens"]))
            content = [{"type": "text", "text": mark}]
        rendered.append({"role": m["role"], "content": content})
    try:
        text = render(template, messages=rendered, add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token)
    except TemplateFailed as e:
        raise ModelFilesError(f"the chat template failed on this conversation ({e})") from None
    pieces, rest, queue = [], text, list(images)
    for mark, tokens in replies:
        before, found, rest = rest.partition(mark)
        if not found:  # the template rewrote replies: fall back to plain re-tokenisation
            return render_prompt(template, messages, bos_token, eos_token, splice=False)
        pieces += [_text_piece(before, queue), ("tokens", tokens)]
    return pieces + [_text_piece(rest, queue)]


def _text_piece(text: str, queue: list) -> tuple:
    n = text.count(MEDIA_MARKER)
    taken, queue[:n] = queue[:n], []
    return ("text", text, taken)
