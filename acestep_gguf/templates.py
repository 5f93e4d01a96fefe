"""Chat templates are untrusted input: they are only ever rendered in this sandbox."""

from __future__ import annotations

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

MEDIA_MARKER = "<__media__>"  # mtmd's default marker: where each image goes in the rendered prompt


def sandbox() -> ImmutableSandboxedEnvironment:
    """The Jinja environment every template is rendered in (llama-cpp-python's settings)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env
