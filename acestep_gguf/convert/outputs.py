"""Outputs are born as ``*.partial``, re-read and checked with gguf-py, then renamed into place.
A failed or interrupted run therefore leaves earlier files untouched and no partial file behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from gguf import GGUFReader

from ..errors import OutputError
from ..manifest import MANIFEST, Manifest, ManifestFile, sha256_of


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


def check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(f"{folder}: {free / 1e9:.1f} GB free but this conversion needs about "
                          f"{needed / 1e9:.1f} GB (outputs plus a lossless intermediate); free space or use --out")


def verify(path: Path, arch: str, expected: dict[str, tuple[int, ...]]) -> None:
    """The written file parses, has the right architecture and exactly the planned tensors and shapes
    (``expected`` in GGUF dimension order)."""
    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise OutputError(f"{path.name}: written file does not parse as GGUF ({e})") from None
    field = reader.fields.get("general.architecture")
    found_arch = field.contents() if field is not None else None
    if found_arch != arch:
        raise OutputError(f"{path.name}: general.architecture is {found_arch!r}, expected {arch!r}")
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    if shapes != expected:
        wrong = sorted(set(shapes.items()) ^ set(expected.items()))
        raise OutputError(f"{path.name}: tensors differ from the plan (first difference: {wrong[0][0]})")


def publish(partial: Path, final: Path, role: str, type_name: str) -> ManifestFile:
    """Rename a verified partial into place and describe it for the manifest."""
    entry = ManifestFile(final.name, role, type_name, partial.stat().st_size, sha256_of(partial))
    os.replace(partial, final)
    return entry


def still_valid(folder: Path, entry: ManifestFile | None) -> bool:
    """An earlier output is reused only while its bytes are exactly those the manifest recorded."""
    if entry is None:
        return False
    path = folder / entry.file
    return path.is_file() and path.stat().st_size == entry.bytes and sha256_of(path) == entry.sha256


def write_manifest(folder: Path, manifest: Manifest) -> None:
    partial = folder / (MANIFEST + ".partial")
    partial.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(partial, folder / MANIFEST)
