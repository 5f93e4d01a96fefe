"""checkpoint → plan → lossless writers → quantize → outputs: the one driver behind `convert`."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Iterable

from .. import __version__, interrupts
from ..errors import AcestepGGUFError, OptionError, OutputError
from ..manifest import Manifest, ManifestFile
from ..models.registry import detect
from .checkpoint import open_checkpoint
from .gguf_stream import write_gguf
from .language import language_file
from .outputs import (PartialFiles, check_space, exclusive, publish, remove_stale_partials, still_valid, verify,
                      write_manifest)
from .plan import make_plan
from ..quant_types import ALL_QUANTIZED, TYPES, VISION_TYPES
from .quantize import quantize
from .safetensors_file import TensorReader
from .vision import vision_file



class ConvertProgress:
    """Callbacks the converter calls; the CLI draws them, a Python caller may ignore them."""

    def phase(self, name: str, total: int, unit: str) -> None: ...
    def advance(self, completed: int) -> None: ...
    def file_done(self, entry: ManifestFile, reused: bool) -> None: ...


def parse_quant(quant: str | Iterable[str]) -> list[str]:
    names = [q.strip() for q in (quant.split(",") if isinstance(quant, str) else quant) if q.strip()]
    out: list[str] = []
    for q in names:
        for t in (ALL_QUANTIZED if q.lower() == "all" else [q.upper()]):
            if t not in TYPES:
                raise OptionError(f"--quant {q}: unknown type; choose from {', '.join(TYPES)} or all")
            if t not in out:
                out.append(t)
    if not out:
        raise AcestepGGUFError("--quant: give at least one type")
    return out


def _default_name(source: str, folder: Path) -> str:
    base = source.rstrip("/").split("/")[-1] if not Path(source).expanduser().is_dir() else folder.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "model"


def convert(source: str | os.PathLike, out: str | os.PathLike | None = None, quant: str | Iterable[str] = "Q4_K_M",
            mmproj_quant: str = "F16", name: str | None = None, force: bool = False, threads: int | None = None,
            verbose: bool = False, progress: ConvertProgress | None = None) -> Manifest:
    """Convert a llava-style safetensors checkpoint to GGUF files plus manifest.json; returns the manifest."""
    with interrupts.deferred():  # Ctrl-C is raised at safe points, never inside a llama.cpp callback
        return _convert(source, out, quant, mmproj_quant, name, force, threads, verbose,
                        progress or ConvertProgress())


def _convert(source, out, quant, mmproj_quant, name, force, threads, verbose, progress) -> Manifest:
    types = parse_quant(quant)
    mmproj_quant = mmproj_quant.upper()
    if mmproj_quant not in VISION_TYPES:
        raise OptionError(f"--mmproj-quant {mmproj_quant}: choose {' or '.join(VISION_TYPES)}")
    if threads is not None and (type(threads) is not int or not 1 <= threads <= 1024):
        raise OptionError(f"--threads {threads!r}: a whole number from 1 to 1024")
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise AcestepGGUFError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")

    ckpt = open_checkpoint(source)
    family = detect(ckpt.config, str(ckpt.folder / "config.json"))
    plan = make_plan(ckpt, family)
    name = name or _default_name(str(source), ckpt.folder)
    folder = Path(out or f"{name}-gguf").expanduser().resolve()
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot create the output folder ({e.strerror})") from None
    try:
        with exclusive(folder):
            remove_stale_partials(folder)
            return _convert_into(folder, ckpt, family, plan, name, types, mmproj_quant, force, threads, verbose,
                                 progress)
    except OSError as e:  # disk full, permissions, a file removed under us: name it, no traceback
        if e.errno == errno.EROFS:
            raise OutputError(f"{folder}: Read-only file system (there are outputs to write)") from None
        raise OutputError(f"{e.filename or folder}: {e.strerror or e}") from None
    finally:
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # a failed first run leaves no trace at all


def _convert_into(folder, ckpt, family, plan, name, types, mmproj_quant, force, threads, verbose, progress) -> Manifest:

    previous = _previous(folder, ckpt.source["fingerprint"])
    wanted = [("language", t, f"{name}-{t}.gguf") for t in types] + [("vision", mmproj_quant, f"mmproj-{name}-{mmproj_quant}.gguf")]
    kept: dict[tuple[str, str], ManifestFile] = {}
    todo = []
    for role, t, file in wanted:
        entry = previous.entry(role, t) if previous else None
        if not force and entry is not None and entry.file == file and still_valid(folder, entry):
            kept[(role, t)] = entry
            progress.file_done(entry, reused=True)
        else:
            todo.append((role, t, file))

    files = TensorReader()
    written: dict[tuple[str, str], ManifestFile] = {}
    try:
        if todo:
            _check_space(folder, plan, todo)
            with PartialFiles(folder) as partials:
                # Everything is written and verified as *.partial first; only then is anything renamed,
                # so a NaN found in the last tensor still leaves the folder as it was.
                ready = []
                for role in ("language", "vision"):
                    jobs = [(t, file) for r, t, file in todo if r == role]
                    if jobs:
                        ready += _produce(role, jobs, plan, ckpt, name, files, partials, threads, verbose, progress)
                for role, type_name, partial, final in ready:
                    written[(role, type_name)] = entry = publish(partial, final, role, type_name)
                    progress.file_done(entry, reused=False)
    finally:
        files.close()

    source_info = {**ckpt.source, "architecture": family.architectures[0], "family": family.name}
    entries = [written.get((r, t)) or kept[(r, t)] for r, t, _ in wanted]
    others = [f for f in (previous.files if previous else []) if (f.role, f.type) not in {(r, t) for r, t, _ in wanted}
              and (folder / f.file).is_file()]
    manifest = Manifest(name, source_info, __version__, entries + others)
    write_manifest(folder, manifest)
    return manifest


def _previous(folder: Path, fingerprint: str) -> Manifest | None:
    """The earlier manifest, if it describes outputs of this very checkpoint."""
    try:
        manifest = Manifest.read(folder)
    except AcestepGGUFError:
        return None
    return manifest if manifest.source.get("fingerprint") == fingerprint else None


def _check_space(folder: Path, plan, todo) -> None:
    n_params = {role: sum(p.source.n_elements for p in getattr(plan, role)) for role in ("language", "vision")}
    n_bytes = {role: sum(p.source.nbytes for p in getattr(plan, role)) for role in ("language", "vision")}
    needed = sum(n_bytes[r] for r in {r for r, _, _ in todo})
    needed += sum(int(n_params[r] * TYPES[t].bits_per_weight / 8) for r, t, _ in todo)
    check_space(folder, int(needed * 1.05) + (64 << 20))


def _produce(role, jobs, plan, ckpt, name, files, partials, threads, verbose, progress) -> list:
    """Write the lossless intermediate of one role, quantize and verify each requested type from it;
    returns (role, type, partial, final) for publishing."""
    if role == "language":
        metadata, tensors, _ = language_file(plan, ckpt, name)
        arch, intermediate = plan.family.gguf_arch, partials.path(f"{name}-lossless.gguf")
    else:
        metadata, tensors = vision_file(plan, name)
        arch, intermediate = "clip", partials.path(f"mmproj-{name}-lossless.gguf")
    expected = {t.gguf_name: tuple(reversed(t.source.shape)) for t in tensors}
    progress.phase(f"write {role} (lossless)", sum(t.source.nbytes for t in tensors), "bytes")
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress.advance(done)
        interrupts.check()  # a safe point: between two chunks

    write_gguf(intermediate, arch, metadata, tensors, files, advance)
    ready = []
    for type_name, file in jobs:
        partial = partials.path(file)
        progress.phase(f"quantize {file}", len(tensors), "tensors")
        quantize(intermediate, partial, type_name, threads=threads, verbose=verbose,
                 on_tensor=lambda i, n: progress.advance(i))
        verify(partial, arch, expected)
        ready.append((role, type_name, partial, partial.parent / file))
    intermediate.unlink()  # free its disk space before the next role's intermediate
    return ready
