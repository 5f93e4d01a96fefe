"""Choose the chat template stored in the GGUF: the checkpoint's own when it renders every probe
conversation the runtime will send (images as parts, several turns, a system message), the family's
built-in one otherwise. Rendered only in the budgeted sandbox, so a hostile template cannot hang us."""

from __future__ import annotations

from ..templates import PROBES, TemplateFailed, compile_template, probe


def problem(template: str) -> str | None:
    """Why this template cannot be used as it is, or None when it renders every probe."""
    try:
        compiled = compile_template(template)
        for which in PROBES:
            probe(compiled, which)
    except TemplateFailed as e:
        return str(e)
    return None


def choose(checkpoint_template: str | None, builtin: str) -> tuple[str, str]:
    """(template, where it came from) for the language-model GGUF."""
    if checkpoint_template and problem(checkpoint_template) is None:
        return checkpoint_template, "checkpoint"
    return builtin, "builtin"
