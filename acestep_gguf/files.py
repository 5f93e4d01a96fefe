"""Opening files we did not write: only regular files (a symlink to one is fine, as in the Hugging
Face cache), never a FIFO, device or directory, and never more bytes than a real file of that kind
holds. Every refusal is the caller's typed error, naming the file."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import AcestepGGUFError

MAX_JSON_BYTES = 64 << 20  # tokenizer.json of a 256k vocabulary is ~20 MB
MAX_TEXT_BYTES = 1 << 20  # a chat template


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, error: type[AcestepGGUFError], what: str = "file",
                 follow_symlinks: bool = True) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (and, with ``follow_symlinks`` false,
    not a symlink). O_NONBLOCK makes opening a FIFO return at once (instead of waiting for a
    writer), so fstat can refuse it."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, expected a {what}") from None
    except OSError as e:
        if e.errno == errno.ELOOP and not follow_symlinks:
            raise error(f"{path}: is a symlink, expected a {what}") from None
        raise error(f"{path}: cannot open ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path}: is {kind_of(mode)}, expected a {what}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(path: Path, error: type[AcestepGGUFError], limit: int, what: str = "file") -> bytes:
    with open_regular(path, error, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise error(f"{path}: {size} bytes is over the {limit >> 20} MiB limit for a {what}")
        return f.read(limit + 1)[:limit]


def read_text(path: Path, error: type[AcestepGGUFError], limit: int = MAX_TEXT_BYTES, what: str = "file") -> str:
    data = read_bytes(path, error, limit, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path.name}: not UTF-8 text (byte {e.start})") from None


def loads_json(raw: bytes | str, error: type[AcestepGGUFError], where: str):
    """json.loads with every failure (syntax, bad UTF-8, nesting deep enough to recurse, an integer past
    Python's 4300-digit limit) as one line."""
    try:
        return json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, the int-digit limit
        raise error(f"{where}: not valid JSON ({str(e).splitlines()[0][:160]})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None


def read_json_object(path: Path, error: type[AcestepGGUFError], limit: int = MAX_JSON_BYTES) -> dict:
    value = loads_json(read_bytes(path, error, limit, "JSON file"), error, path.name)
    if not isinstance(value, dict):
        raise error(f"{path.name}: expected a JSON object, got {type(value).__name__}")
    return value


def bare_name(name: str) -> bool:
    """A plain file name inside a folder: no separators, no '..', not absolute, not hidden."""
    return isinstance(name, str) and bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\x00")


def exists(path: Path) -> bool:
    """True for anything at ``path``, a dangling symlink included (so it is reported, not skipped)."""
    return os.path.lexists(path)
