"""Choose the chat template stored in the GGUF: the checkpoint's own when it handles images as
multimodal runtimes pass them, the family's built-in one otherwise. Rendered only in a sandbox."""

from __future__ import annotations

from ..templates import MEDIA_MARKER, sandbox

_PROBE = "acestep-gguf probe question"


def renders_image_parts(template: str) -> bool:
    """True when a user message made of [image, text] parts renders with the image marker placed
    before the text, the way llama-cpp-python's MTMDChatHandler passes images."""
    messages = [{"role": "user", "content": [{"type": "text", "text": MEDIA_MARKER},
                                             {"type": "text", "text": _PROBE}]}]
    try:
        text = sandbox().from_string(template).render(messages=messages, add_generation_prompt=True,
                                                       bos_token="", eos_token="")
    except Exception:  # any template error means: not usable as is
        return False
    marker, probe = text.find(MEDIA_MARKER), text.find(_PROBE)
    return 0 <= marker < probe and "'type'" not in text


def choose(checkpoint_template: str | None, builtin: str) -> tuple[str, str]:
    """(template, where it came from) for the language-model GGUF."""
    if checkpoint_template and renders_image_parts(checkpoint_template):
        return checkpoint_template, "checkpoint"
    return builtin, "builtin"
