"""Facts about the machine that several modules need."""

from __future__ import annotations

import os


def default_threads() -> int:
    """The cores this process may run on (respects CPU affinity / container limits)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
