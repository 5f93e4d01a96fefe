"""Facts about the machine that several modules need."""

from __future__ import annotations

import ctypes
import os


def default_threads() -> int:
    """The cores this process may run on (respects CPU affinity / container limits)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_memory() -> int | None:
    """Bytes of RAM the kernel says can be had without swapping (MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def release_free_memory() -> None:
    """Hand memory freed by Python, Pillow and numpy back to the system (glibc's malloc_trim): after a
    large picture is decoded and dropped, glibc keeps the freed pages in its arenas otherwise, and a
    long-running server's RSS grows by pictures it no longer holds. A no-op elsewhere."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
