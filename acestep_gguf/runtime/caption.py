"""Batch captioning: one loaded model, one JSON line per image, resumable, failures recorded once.

The output file is the only state. Each record is appended with a single write() on an O_APPEND
descriptor, so a crash leaves whole lines plus at most one torn last line; that torn line is cut
off before the next run appends. An image is done when it has a line: re-runs skip it, and a failed
one is retried only when asked (its old error line is then replaced, never duplicated)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import ImageError, OutputError
from ..files import open_regular
from .batch import BatchRequest


def collect_images(inputs: Iterable[Path], suffixes: tuple[str, ...]) -> list[Path]:
    """Files as given, folders searched recursively, in a stable order; nothing found is an error."""
    files: list[Path] = []
    for item in inputs:
        item = Path(item).expanduser()
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        elif os.path.lexists(item):
            files.append(item)  # a bad file is recorded as a failed image, not a reason to stop
        else:
            raise ImageError(f"{item}: no such file or folder")
    if not files:
        raise ImageError("no images found (looked for " + ", ".join(suffixes) + ")")
    return files


def read_records(out_file: Path) -> list[dict]:
    """The whole records of an earlier run (read line by line), after cutting off a torn last line."""
    if not os.path.lexists(out_file):
        return []
    records, whole = [], 0  # bytes up to the end of the last complete line
    with open_regular(out_file, OutputError, "JSON-lines file") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # the last write was cut short: this partial record is dropped below
            whole += len(raw)
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError):  # not JSON, not UTF-8, a number past the digit limit
                continue
            if isinstance(record, dict) and isinstance(record.get("image"), str):
                records.append(record)
        torn = f.tell() != whole or os.fstat(f.fileno()).st_size != whole
    if torn:
        try:
            os.truncate(out_file, whole)
        except OSError as e:
            raise OutputError(f"{out_file}: cannot repair its torn last line ({e.strerror})") from None
    return records


def _rewrite_without(out_file: Path, drop: set[str]) -> None:
    """Remove the error lines of images about to be retried (atomically: temp file + rename)."""
    lines = out_file.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [ln for ln in lines if not _is_error_for(ln, drop)]
    tmp = out_file.with_name(out_file.name + ".partial")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, out_file)


def _is_error_for(line: str, images: set[str]) -> bool:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(record, dict) and "error" in record and record.get("image") in images


def pending(files: list[Path], out_file: Path, retry_failed: bool = False) -> tuple[list[Path], int]:
    """(images still to caption, how many are already done); with ``retry_failed`` the error lines of
    the failed ones are removed first, so that each image keeps exactly one line."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    records = read_records(out_file)
    captioned = {r["image"] for r in records if "text" in r}
    failed = {r["image"] for r in records if "error" in r} - captioned
    retry = {str(p) for p in files} & failed if retry_failed else set()
    if retry:
        _rewrite_without(out_file, retry)
    todo = [p for p in files if str(p) not in captioned and (str(p) not in failed or str(p) in retry)]
    return todo, len(files) - len(todo)


def caption_records(chat, paths: list, prompt: str, max_tokens: int) -> Iterator[dict]:
    """One record per picture, in the given order: {"image", "text", ...} or {"image", "error"}; each
    picture a fresh conversation, up to ``chat.parallel`` of them decoded together. A picture whose
    turn was cancelled (Ctrl-C) gets no record: it is captioned on the next run."""
    for reply in chat.batch((BatchRequest(prompt, (path,)) for path in paths), max_tokens=max_tokens):
        key = str(paths[reply.index])
        if reply.error is not None:
            yield {"image": key, "error": reply.error}
        elif reply.stats.finish_reason != "cancelled":
            yield {"image": key, "text": reply.text.strip(), "prompt": prompt,
                   "completion_tokens": reply.stats.completion_tokens, "finish_reason": reply.stats.finish_reason}


class Appender:
    """The output file, opened for appending: each record goes out in one write() of one whole line."""

    def __init__(self, out_file: Path):
        self.fd = os.open(out_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict) -> None:
        os.write(self.fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def close(self) -> None:
        os.close(self.fd)


def caption_images(chat, files: list[Path], prompt: str, out_file: Path, max_tokens: int = 256,
                   retry_failed: bool = False, on_image: Callable[[dict], None] = lambda record: None) -> dict:
    """Append one record per image not captioned yet, in input order; each image starts a fresh
    conversation, ``chat.parallel`` of them at a time (a line is written once every earlier
    picture's is: a file made with --parallel 4 equals one made with --parallel 1)."""
    todo, skipped = pending(files, out_file, retry_failed)
    summary = {"captioned": 0, "skipped": skipped, "failed": 0}
    for _ in range(skipped):
        on_image({"skipped": True})
    sink = Appender(out_file)
    try:
        for record in caption_records(chat, todo, prompt, max_tokens):
            summary["failed" if "error" in record else "captioned"] += 1
            sink.write(record)
            on_image(record)
    finally:
        sink.close()
    return summary
