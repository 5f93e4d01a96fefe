"""Batch captioning: one loaded model, one JSON line per image, resumable, failures recorded once.

The output file is the only state. Each record is appended with a single write() on an O_APPEND
descriptor, so a crash leaves whole lines plus at most one torn last line; that torn line is cut
off before the next run appends. An image is done when it has a line: re-runs skip it, and a failed
one is retried only when asked (its old error line is then replaced, never duplicated)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

from ..errors import AcestepGGUFError, ImageError, OutputError
from ..files import open_regular


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
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
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
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "error" in record and record.get("image") in images


def caption_images(chat, files: list[Path], prompt: str, out_file: Path, max_tokens: int = 256,
                   retry_failed: bool = False, on_image: Callable[[dict], None] = lambda record: None) -> dict:
    """Append {"image", "text", ...} or {"image", "error"} per image; each image starts a fresh conversation."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    records = read_records(out_file)
    captioned = {r["image"] for r in records if "text" in r}
    failed = {r["image"] for r in records if "error" in r} - captioned
    retry = {str(p) for p in files} & failed if retry_failed else set()
    if retry:
        _rewrite_without(out_file, retry)
    summary = {"captioned": 0, "skipped": 0, "failed": 0}
    fd = os.open(out_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for path in files:
            key = str(path)
            if key in captioned or (key in failed and key not in retry):
                summary["skipped"] += 1
                on_image({"image": key, "skipped": True})
                continue
            chat.reset()
            try:
                text = chat.ask(prompt, [path], max_tokens=max_tokens)
                t = chat.last_turn
                record = {"image": key, "text": text.strip(), "prompt": prompt,
                          "completion_tokens": t.completion_tokens, "finish_reason": t.finish_reason}
                summary["captioned"] += 1
            except AcestepGGUFError as e:
                record = {"image": key, "error": str(e)}
                summary["failed"] += 1
            os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))  # one whole line
            on_image(record)
    finally:
        os.close(fd)
    return summary
