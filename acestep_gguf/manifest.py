"""manifest.json: what a conversion wrote. The converter writes it; the runtime reads nothing else."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ModelFilesError
from .files import bare_name, read_json_object
from .quant_types import LANGUAGE_PREFERENCE, VISION_PREFERENCE

MANIFEST = "manifest.json"


@dataclass
class ManifestFile:
    file: str
    role: str  # "language" or "vision"
    type: str  # llama.cpp type name
    bytes: int
    sha256: str


@dataclass
class Manifest:
    name: str
    source: dict
    tool_version: str
    files: list[ManifestFile] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        """The manifest, every field checked: file entries must be plain names inside the folder."""
        path = Path(folder) / MANIFEST
        if not os.path.lexists(path):
            raise ModelFilesError(f"{path}: missing; is {folder} a folder written by `acestep-gguf convert`?")
        data = read_json_object(path, ModelFilesError, limit=16 << 20)
        name, source, version, files = (data.get(k) for k in ("name", "source", "tool_version", "files"))
        if not (isinstance(name, str) and isinstance(source, dict) and isinstance(version, str)
                and isinstance(files, list)):
            raise ModelFilesError(f"{path}: not a manifest written by acestep-gguf (name, source, tool_version, "
                                  "files missing or of the wrong type)")
        return cls(name, source, version, [_entry(f, path) for f in files])

    def entry(self, role: str, type_name: str) -> ManifestFile | None:
        return next((f for f in self.files if f.role == role and f.type == type_name), None)

    def pick(self, role: str, type_name: str | None) -> ManifestFile:
        """The file of that role and type; with no type, the first present in preference order."""
        if type_name is not None:
            found = self.entry(role, type_name)
            if found is None:
                have = ", ".join(f.type for f in self.files if f.role == role) or "none"
                raise ModelFilesError(f"{MANIFEST}: no {role} file of type {type_name} (present: {have})")
            return found
        for candidate in (LANGUAGE_PREFERENCE if role == "language" else VISION_PREFERENCE):
            if self.entry(role, candidate):
                return self.entry(role, candidate)
        raise ModelFilesError(f"{MANIFEST}: lists no {role} file")


def _entry(item, path: Path) -> ManifestFile:
    types = {"file": str, "role": str, "type": str, "bytes": int, "sha256": str}
    if not (isinstance(item, dict) and all(type(item.get(k)) is t for k, t in types.items())):
        raise ModelFilesError(f"{path}: file entry {str(item)[:80]!r} lacks file, role, type, bytes or sha256")
    name = item["file"]
    if not bare_name(name) or item["role"] not in ("language", "vision"):
        raise ModelFilesError(f"{path}: file entry {name!r} is not a plain file name of role language or vision")
    return ManifestFile(**{k: item[k] for k in types})


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * 1024 * 1024), b""):
            h.update(block)
    return h.hexdigest()
