"""Choose the chat template stored in the GGUF: the checkpoint's own when it renders every probe
conversation the runtime will send (pictures as image parts, several turns, a system message) with
exactly one of the checkpoint's image placeholders per picture, inside its message; the family's
built-in one otherwise. Rendered only in the budgeted sandbox, so a hostile template cannot hang us."""

from __future__ import annotations

from dataclasses import dataclass

from ..templates import MEDIA_MARKER, ImageStyle, TemplateFailed, check, compile_template


@dataclass(frozen=True)
class TemplateChoice:
    template: str
    source: str  # "checkpoint" or "builtin"
    placeholder: str  # the text the template writes for each image part
    note: str | None = None  # why the checkpoint's own was not kept


def problem(template: str, placeholder: str | None) -> str | None:
    """Why this template cannot be used as it is, or None when it renders every probe."""
    if placeholder is None:
        return "the checkpoint has no image token, so its pictures cannot be located in the template's output"
    try:
        compiled, first = compile_template(template), None
    except TemplateFailed as e:
        return str(e)
    for as_string in (False, True):  # text-only messages as lists of parts, else as strings (Pixtral's replies)
        try:
            check(compiled, ImageStyle(True, placeholder, as_string))
            return None
        except TemplateFailed as e:
            first = first or str(e)
    return first


def choose(checkpoint_template: str | None, builtin: str, placeholder: str | None) -> TemplateChoice:
    """The template for the language-model GGUF, and the placeholder the runtime looks for."""
    if not checkpoint_template:
        return TemplateChoice(builtin, "builtin", MEDIA_MARKER)
    why = problem(checkpoint_template, placeholder)
    if why is None:
        return TemplateChoice(checkpoint_template, "checkpoint", placeholder)
    return TemplateChoice(builtin, "builtin", MEDIA_MARKER, f"the checkpoint's chat template was replaced by the "
                          f"built-in one: {why}")
