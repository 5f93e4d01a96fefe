"""Outputs are born as ``*.partial``, their headers re-read and checked, then renamed into place.
A failed or interrupted run therefore leaves earlier files untouched and no partial file behind."""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..errors import ModelFilesError, OutputError
from ..manifest import MANIFEST, Manifest, ManifestFile, sha256_of
from ..runtime.gguf_header import read_header


class PartialFiles:
    """Hands out ``*.partial`` paths and deletes every one still there when the block ends."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.paths: list[Path] = []

    def __enter__(self) -> "PartialFiles":
        return self

    def path(self, final_name: str) -> Path:
        p = self.folder / (final_name + ".partial")
        p.unlink(missing_ok=True)  # left by a run that was killed outright
        self.paths.append(p)
        return p

    def __exit__(self, *exc) -> None:
        for p in self.paths:
            p.unlink(missing_ok=True)


@contextmanager
def exclusive(folder: Path):
    """Hold an exclusive lock on the output folder itself (flock on its descriptor: no lock file to
    leave behind, works on read-only media) for the whole conversion."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"{folder}: another conversion is writing here; wait for it to finish or use --out") from None
        except OSError:
            pass  # a filesystem without flock: go on unlocked
        yield
    finally:
        os.close(fd)


def remove_stale_partials(folder: Path) -> None:
    """Partial files of a run that was killed outright (we hold the folder's lock: no one is writing them)."""
    for p in list(folder.glob("*.gguf.partial")) + [folder / (MANIFEST + ".partial")]:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass  # read-only media: nothing of ours can be there to remove


def check_space(folder: Path, needed: int, intermediate: bool = False) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        what = "outputs plus a lossless intermediate" if intermediate else "for its outputs"
        raise OutputError(f"{folder}: {_amount(free)} free but this conversion needs about {_amount(needed)} "
                          f"({what}); free space or use --out")


def _amount(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def verify(path: Path, arch: str, expected: dict[str, tuple[int, ...]]) -> None:
    """The written file parses (the strict header reader: every tensor's extent within the file),
    has the right architecture and exactly the planned tensors and shapes (``expected`` in GGUF
    dimension order). Reads the header only: the vocabulary is scanned, not decoded."""
    try:
        header = read_header(path, "written")
    except ModelFilesError as e:
        raise OutputError(f"{path.name}: written file does not parse as GGUF ({e})") from None
    found_arch = header.fields.get("general.architecture")
    if found_arch != arch:
        raise OutputError(f"{path.name}: general.architecture is {found_arch!r}, expected {arch!r}")
    shapes = {t.name: tuple(t.shape) for t in header.tensors}
    if shapes != expected:
        wrong = sorted(set(shapes.items()) ^ set(expected.items()))
        raise OutputError(f"{path.name}: tensors differ from the plan (first difference: {wrong[0][0]})")


def publish(partial: Path, final: Path, role: str, type_name: str, sha256: str | None = None) -> ManifestFile:
    """Rename a verified partial into place and describe it for the manifest (``sha256`` when it was
    computed while writing)."""
    entry = ManifestFile(final.name, role, type_name, partial.stat().st_size, sha256 or sha256_of(partial))
    os.replace(partial, final)
    return entry


def still_valid(folder: Path, entry: ManifestFile | None) -> bool:
    """An earlier output is reused only while its bytes are exactly those the manifest recorded."""
    if entry is None:
        return False
    path = folder / entry.file
    return path.is_file() and path.stat().st_size == entry.bytes and sha256_of(path) == entry.sha256


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Replace manifest.json atomically; a re-run that changes nothing writes nothing."""
    text = manifest.to_json()
    try:
        if (folder / MANIFEST).read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    partial = folder / (MANIFEST + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, folder / MANIFEST)
