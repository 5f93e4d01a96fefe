"""Batch captioning: one loaded model, one JSON line per image, resumable, failures recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from ..errors import AcestepGGUFError, ImageError


def collect_images(inputs: Iterable[Path], suffixes: tuple[str, ...]) -> list[Path]:
    """Files as given, folders searched recursively, in a stable order; nothing found is an error."""
    files: list[Path] = []
    for item in inputs:
        item = Path(item).expanduser()
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        elif item.is_file():
            files.append(item)
        else:
            raise ImageError(f"{item}: no such file or folder")
    if not files:
        raise ImageError("no images found (looked for " + ", ".join(suffixes) + ")")
    return files


def _done(out_file: Path) -> set[str]:
    """Images already captioned successfully by an earlier run of the same output file."""
    if not out_file.exists():
        return set()
    done = set()
    for line in out_file.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupted run
        if isinstance(record, dict) and "text" in record and "image" in record:
            done.add(record["image"])
    return done


def caption_images(chat, files: list[Path], prompt: str, out_file: Path, max_tokens: int = 256,
                   on_image: Callable[[dict], None] = lambda record: None) -> dict:
    """Append {"image", "text", ...} or {"image", "error"} per image; each image starts a fresh conversation."""
    done = _done(out_file)
    summary = {"captioned": 0, "skipped": 0, "failed": 0}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with open(out_file, "a", encoding="utf-8") as sink:
        for path in files:
            key = str(path)
            if key in done:
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
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()
            on_image(record)
    return summary
