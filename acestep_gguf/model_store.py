"""Models by name: a folder of converted models, one subfolder per name, as Ollama keeps its models.

`$ACESTEP_GGUF_MODELS`, else `<cache>/models`. A model is a converted folder (GGUF files + manifest.json)
named by a plain name; `NAME:TYPE` picks a quantization (`acestep:Q8_0`), as Ollama's tags do. A
model enters the store whole or not at all: `pull` converts into a hidden `.partial-*` folder and
renames it into place (or, for a name already there, converts into it, which is itself all or
nothing); `import` checks a GGUF pair as `chat` would and links (or copies) it in. A lock per name
keeps two `pull`s of one name apart. Hidden entries (`.partial-*`, locks) are never listed."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import AcestepGGUFError, ModelFilesError, OptionError
from .manifest import MANIFEST, Manifest, ManifestFile, sha256_of
from .quant_types import TYPES

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def store_folder() -> Path:
    configured = os.environ.get("ACESTEP_GGUF_MODELS")
    if configured:
        return Path(configured).expanduser()
    from .demo import cache_folder
    return cache_folder() / "models"


def check_name(name: str) -> str:
    """A plain model name: letters, digits, '.', '_' and '-', at most 64, never a path."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise OptionError(f"model name {str(name)[:80]!r}: use letters, digits, '.', '_' and '-' (at most 64, "
                          "starting with a letter or digit)")
    return name


def parse_reference(reference: str) -> tuple[str, str | None]:
    """'name' or 'name:TYPE' (Ollama's 'name:latest' means the default type)."""
    name, _, tag = reference.partition(":")
    check_name(name)
    if not tag or tag.lower() == "latest":
        return name, None
    if tag.upper() not in TYPES:
        raise OptionError(f"{reference!r}: unknown type {tag!r} (use {', '.join(TYPES)})")
    return name, tag.upper()


def looks_like_name(reference: str) -> bool:
    """A store reference rather than a path: no path separator, no leading '.' or '~'."""
    return isinstance(reference, str) and "/" not in reference and not reference.startswith((".", "~")) \
        and reference.partition(":")[0] != "" and os.sep not in reference


@dataclass(frozen=True)
class StoredModel:
    name: str
    folder: Path
    manifest: Manifest
    modified: float

    @property
    def family(self) -> str:
        return self.manifest.source.get("family", "")

    def types(self, role: str = "language") -> list[str]:
        return [f.type for f in self.manifest.files if f.role == role]

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.manifest.files)

    def as_dict(self) -> dict:
        return {"name": self.name, "family": self.family, "types": self.types(), "mmproj": self.types("vision"),
                "bytes": self.bytes, "files": [{"file": f.file, "type": f.type, "bytes": f.bytes} for f in self.manifest.files],
                "modified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.modified)), "folder": str(self.folder)}


class ModelStore:
    def __init__(self, root: Path | None = None):
        self.root = Path(root).expanduser() if root is not None else store_folder()

    # -- reading ----------------------------------------------------------------------------------
    def folder(self, name: str) -> Path:
        return self.root / check_name(name)

    def get(self, name: str) -> StoredModel:
        """The model of that name, its manifest read and every file it lists present."""
        folder = self.folder(name)
        if not folder.is_dir() or folder.is_symlink():
            known = ", ".join(m.name for m in self.list()) or "none; add one with `acestep-gguf pull`"
            raise ModelFilesError(f"model {name!r} is not in the store {self.root} (models: {known})")
        manifest = Manifest.read(folder)
        for f in manifest.files:
            if not (folder / f.file).is_file():
                raise ModelFilesError(f"model {name!r}: {f.file} is missing from {folder} (pull it again, or rm it)")
        return StoredModel(name, folder, manifest, (folder / MANIFEST).stat().st_mtime)

    def list(self) -> list[StoredModel]:
        """Every complete model, by name; broken entries are left out (``problems`` names them)."""
        out = []
        for name in self._names():
            try:
                out.append(self.get(name))
            except AcestepGGUFError:
                continue
        return out

    def stamp(self) -> tuple | None:
        """Changes whenever a model is added, removed or re-converted (the folder's and each manifest's
        modification times): a server re-reads its catalog only then, not on every request."""
        try:
            names = self._names()
            times = []
            for n in names:
                try:
                    times.append((self.root / n / MANIFEST).stat().st_mtime_ns)
                except OSError:
                    times.append(None)
            return (self.root.stat().st_mtime_ns, tuple(names), tuple(times))
        except OSError:
            return None

    def problems(self) -> dict[str, str]:
        """Entries that are not usable models, with the reason."""
        out = {}
        for name in self._names():
            try:
                self.get(name)
            except AcestepGGUFError as e:
                out[name] = str(e)
        return out

    def _names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink())

    def resolve(self, reference: str) -> tuple[Path, str | None]:
        """(folder, quant type or None) of 'name' or 'name:TYPE'."""
        name, quant = parse_reference(reference)
        model = self.get(name)
        if quant is not None and quant not in model.types():
            raise ModelFilesError(f"model {name!r} has no {quant} file (it has {', '.join(model.types())}); "
                                  f"add it with `acestep-gguf pull SOURCE --name {name} --quant {quant}`")
        return model.folder, quant

    # -- writing ----------------------------------------------------------------------------------
    @contextmanager
    def locked(self, name: str):
        """One writer per name (pull, import, rm); a second one is refused at once, not queued."""
        check_name(name)
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise AcestepGGUFError(f"model {name!r}: another pull, import or rm of it is running") from None
            yield

    def pull(self, source: str, name: str, **convert_args) -> StoredModel:
        """Convert a checkpoint (folder, repo id, Hugging Face cache) into the store under ``name``."""
        from .convert import convert
        with self.locked(name):
            self._remove_partials(name)
            final = self.folder(name)
            if final.is_dir():  # more types for a model already here: the converter is all or nothing itself
                convert(source, out=final, name=name, **convert_args)
            else:
                partial = self.root / f".partial-{name}-{os.getpid()}"
                try:
                    convert(source, out=partial, name=name, **convert_args)
                    os.replace(partial, final)
                finally:
                    shutil.rmtree(partial, ignore_errors=True)
            return self.get(name)

    def import_pair(self, model: Path, mmproj: Path, name: str, copy: bool = False) -> tuple[StoredModel, str]:
        """Adopt a GGUF pair made elsewhere, checked as `chat` checks it; files hard-linked when the
        store is on the same file system (else, or with ``copy``, copied). Returns (model, "linked" or
        "copied")."""
        from . import __version__
        from .quant_types import name_of_file_type
        from .runtime.gguf_header import read_header
        from .runtime.model_files import ModelFiles, check_pair, fields_of
        model, mmproj = Path(model).expanduser(), Path(mmproj).expanduser()
        lm, mm = fields_of(read_header(model, "language model")), fields_of(read_header(mmproj, "mmproj"))
        check_pair(lm, mm, ModelFiles(model, mmproj, name, ""))
        quant, vision = (name_of_file_type(f.get("general.file_type", 1)) for f in (lm, mm))  # 1: F16 when unsaid
        if quant not in TYPES:
            raise ModelFilesError(f"{model}: general.file_type {quant} is not a type the store knows "
                                  f"({', '.join(TYPES)})")
        with self.locked(name):
            if self.folder(name).exists():
                raise AcestepGGUFError(f"model {name!r} is already in the store; rm it first or pick another --name")
            self._remove_partials(name)
            partial = self.root / f".partial-{name}-{os.getpid()}"
            partial.mkdir()
            try:
                ways, entries = set(), []
                for role, path, type_name, file in (("language", model, quant, f"{name}-{quant}.gguf"),
                                                    ("vision", mmproj, vision, f"mmproj-{name}-{vision}.gguf")):
                    ways.add(_link_or_copy(path, partial / file, copy))
                    entries.append(ManifestFile(file, role, type_name, (partial / file).stat().st_size,
                                                sha256_of(partial / file)))
                how = "copied" if "copied" in ways else "linked"
                manifest = Manifest(name, {"imported": [str(model), str(mmproj)], "family": _family_of(lm)},
                                    __version__, entries)
                (partial / MANIFEST).write_text(manifest.to_json())
                os.replace(partial, self.folder(name))
            finally:
                shutil.rmtree(partial, ignore_errors=True)
            return self.get(name), how

    def remove(self, name: str) -> StoredModel:
        with self.locked(name):
            folder = self.folder(name)
            if not folder.is_dir() or folder.is_symlink():
                raise ModelFilesError(f"model {name!r} is not in the store {self.root}")
            try:
                model = self.get(name)
            except AcestepGGUFError:  # a broken entry is removed all the same
                model = StoredModel(name, folder, Manifest(name, {}, "", []), 0.0)
            trash = self.root / f".partial-{name}-rm-{os.getpid()}"
            os.replace(folder, trash)  # out of `list` at once, then deleted
            shutil.rmtree(trash, ignore_errors=True)
            return model

    def _remove_partials(self, name: str) -> None:
        """What an interrupted pull or rm of this name left behind."""
        for p in self.root.glob(f".partial-{name}-*"):
            shutil.rmtree(p, ignore_errors=True)


def _link_or_copy(source: Path, target: Path, copy: bool) -> str:
    if not copy:
        try:
            os.link(source, target)
            return "linked"
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise ModelFilesError(f"{source}: cannot link it into the store ({e.strerror})") from None
    shutil.copyfile(source, target)
    return "copied"


def _family_of(fields: dict) -> str:
    from .models.registry import for_gguf
    family = for_gguf(fields, "language")
    return family.name if family else ""
