"""checkpoint → plan → one pass to every output → verify → publish: the one driver behind `convert`.

By default each role's outputs are written in one pass from the safetensors (one_pass.py). With
``via_llama_quantize`` the old route is taken instead: a lossless GGUF intermediate, then
`llama_model_quantize` once per type — the reference the one-pass files are tested against."""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .. import __version__, interrupts
from ..errors import AcestepGGUFError, OptionError, OutputError
from ..manifest import Manifest, ManifestFile
from ..models.registry import detect
from .checkpoint import open_checkpoint
from .gguf_stream import write_gguf
from .imatrix import Imatrix, read_imatrix
from .language import language_file
from .one_pass import write_quantized
from .outputs import (PartialFiles, check_space, exclusive, publish, remove_stale_partials, still_valid, verify,
                      write_manifest)
from .plan import make_plan
from ..quant_types import ALL_QUANTIZED, NOT_OFFERED, TYPES, VISION_TYPES
from ..system import default_threads
from .quantize import quantize
from .safetensors_file import TensorReader
from .vision import vision_file



class ConvertProgress:
    """Callbacks the converter calls; the CLI draws them, a Python caller may ignore them."""

    def phase(self, name: str, total: int, unit: str) -> None: ...
    def advance(self, completed: int) -> None: ...
    def file_done(self, entry: ManifestFile, reused: bool) -> None: ...
    def note(self, text: str) -> None: ...


def parse_quant(quant: str | Iterable[str]) -> list[str]:
    names = [q.strip() for q in (quant.split(",") if isinstance(quant, str) else quant) if q.strip()]
    out: list[str] = []
    for q in names:
        for t in (ALL_QUANTIZED if q.lower() == "all" else [q.upper()]):
            if t in NOT_OFFERED:
                raise OptionError(f"--quant {q}: {t} is not one of the types acestep-gguf writes")
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


@dataclass(frozen=True)
class _Job:
    """One conversion's settings, checked."""

    types: list[str]
    mmproj_quant: str
    threads: int
    force: bool
    verbose: bool
    via_llama_quantize: bool
    progress: ConvertProgress
    imatrix: Imatrix | None = None


def convert(source: str | os.PathLike, out: str | os.PathLike | None = None, quant: str | Iterable[str] = "Q4_K_M",
            mmproj_quant: str = "F16", name: str | None = None, force: bool = False, threads: int | None = None,
            verbose: bool = False, progress: ConvertProgress | None = None,
            via_llama_quantize: bool = False, imatrix: str | os.PathLike | None = None) -> Manifest:
    """Convert a llava-style safetensors checkpoint to GGUF files plus manifest.json; returns the manifest.
    ``via_llama_quantize`` writes a lossless intermediate and runs llama.cpp's quantizer on it instead
    of the one-pass writer (same files, more time and a model's worth of temporary disk). ``imatrix``:
    an importance-matrix file (llama.cpp's GGUF or legacy .dat), as `llama-quantize --imatrix` takes it;
    the IQ2_* / IQ3_XXS / Q2_K_S types need one."""
    with interrupts.deferred():  # Ctrl-C is raised at safe points, never inside a llama.cpp callback
        return _convert(source, out, quant, mmproj_quant, name, force, threads, verbose,
                        progress or ConvertProgress(), via_llama_quantize, imatrix)


def _convert(source, out, quant, mmproj_quant, name, force, threads, verbose, progress, via_llama_quantize,
             imatrix_path=None) -> Manifest:
    types = parse_quant(quant)
    needing = [t for t in types if TYPES[t].needs_imatrix]
    if needing and imatrix_path is None:
        raise OptionError(f"--quant {needing[0]}: llama.cpp makes it only with an importance matrix; give one with "
                          "--imatrix FILE (llama-imatrix's, or a publisher's .imatrix / .dat)")
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
    imatrix = read_imatrix(imatrix_path) if imatrix_path is not None else None
    if imatrix is not None:  # before any output: another model's file is one line, not a broken model
        imatrix.check({p.spec.gguf_name: p.source.shape[-1] for p in plan.language if len(p.source.shape) == 2},
                      f"{ckpt.folder.name}")
        ckpt.source["imatrix"] = {"file": Path(imatrix.path).name, "sha256": imatrix.sha256,
                                  "datasets": list(imatrix.datasets), "chunks": imatrix.chunks}
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
            job = _Job(types, mmproj_quant, threads or default_threads(), force, verbose, via_llama_quantize, progress,
                       imatrix)
            return _convert_into(folder, ckpt, family, plan, name, job)
    except OSError as e:  # disk full, permissions, a file removed under us: name it, no traceback
        if e.errno == errno.EROFS:
            raise OutputError(f"{folder}: Read-only file system (there are outputs to write)") from None
        if e.errno == errno.ENOSPC and e.filename:
            writing = Path(e.filename).name.removesuffix(".partial")
            raise OutputError(f"{folder}: no space left on device while writing {writing}") from None
        raise OutputError(f"{e.filename or folder}: {e.strerror or e}") from None
    finally:
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # a failed first run leaves no trace at all


def _convert_into(folder, ckpt, family, plan, name, job: _Job) -> Manifest:
    progress = job.progress
    previous = _previous(folder, ckpt.source["fingerprint"])
    wanted = ([("language", t, f"{name}-{t}.gguf") for t in job.types]
              + [("vision", job.mmproj_quant, f"mmproj-{name}-{job.mmproj_quant}.gguf")])
    kept: dict[tuple[str, str], ManifestFile] = {}
    todo = []
    same_imatrix = previous is not None and previous.source.get("imatrix") == ckpt.source.get("imatrix")

    def reusable(entry: ManifestFile) -> bool:
        """Files an importance matrix shapes are kept only if made with this one (F16, BF16, mmproj: always)."""
        return same_imatrix or entry.role == "vision" or entry.type in UNSHAPED

    for role, t, file in wanted:
        entry = previous.entry(role, t) if previous else None
        if (not job.force and entry is not None and entry.file == file and reusable(entry)
                and still_valid(folder, entry)):
            kept[(role, t)] = entry
            progress.file_done(entry, reused=True)
        else:
            todo.append((role, t, file))

    files = TensorReader()
    written: dict[tuple[str, str], ManifestFile] = {}
    try:
        if todo:
            _check_space(folder, plan, todo, job.via_llama_quantize)
            with PartialFiles(folder) as partials:
                # Everything is written and verified as *.partial first; only then is anything renamed,
                # so a NaN found in the last tensor still leaves the folder as it was.
                ready = []
                for role in ("language", "vision"):
                    jobs = [(t, file) for r, t, file in todo if r == role]
                    if jobs:
                        ready += _produce(role, jobs, plan, ckpt, name, files, partials, job)
                for role, type_name, partial, final, digest in ready:
                    written[(role, type_name)] = entry = publish(partial, final, role, type_name, digest)
                    progress.file_done(entry, reused=False)
    finally:
        files.close()

    source_info = {**ckpt.source, "architecture": family.architectures[0], "family": family.name}
    entries = [written.get((r, t)) or kept[(r, t)] for r, t, _ in wanted]
    others = [f for f in (previous.files if previous else []) if (f.role, f.type) not in {(r, t) for r, t, _ in wanted}
              and (folder / f.file).is_file() and reusable(f)]
    manifest = Manifest(name, source_info, __version__, entries + others)
    write_manifest(folder, manifest)
    return manifest


UNSHAPED = ("F16", "BF16")  # language types no importance matrix changes


def _previous(folder: Path, fingerprint: str) -> Manifest | None:
    """The earlier manifest, if it describes outputs of this very checkpoint."""
    try:
        manifest = Manifest.read(folder)
    except AcestepGGUFError:
        return None
    return manifest if manifest.source.get("fingerprint") == fingerprint else None


def _check_space(folder: Path, plan, todo, intermediate: bool) -> None:
    n_params = {role: sum(p.source.n_elements for p in getattr(plan, role)) for role in ("language", "vision")}
    n_bytes = {role: sum(p.source.nbytes for p in getattr(plan, role)) for role in ("language", "vision")}
    needed = sum(int(n_params[r] * TYPES[t].bits_per_weight / 8) for r, t, _ in todo)
    if intermediate:
        needed += max(n_bytes[r] for r in {r for r, _, _ in todo})  # one role's intermediate at a time
    check_space(folder, int(needed * 1.05) + (64 << 20), intermediate)


def _produce(role, jobs, plan, ckpt, name, files, partials, job: _Job) -> list:
    """Write, then verify, every requested type of one role; returns (role, type, partial, final,
    sha256 or None) for publishing."""
    if role == "language":
        metadata, tensors, notes = language_file(plan, ckpt, name)
        arch = plan.family.gguf_arch
        imatrix = job.imatrix
        for text in notes:
            job.progress.note(text)
    else:
        metadata, tensors = vision_file(plan, name)
        arch, imatrix = "clip", None  # importance matrices cover the language model
    expected = {t.gguf_name: tuple(reversed(t.source.shape)) for t in tensors}
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        job.progress.advance(done)
        interrupts.check()  # a safe point: between two chunks

    if job.via_llama_quantize:
        written = _via_llama_quantize(role, jobs, arch, metadata, tensors, files, partials, name, job, advance, imatrix)
    else:
        job.progress.phase(f"write {role} ({', '.join(t for t, _ in jobs)})", sum(t.source.nbytes for t in tensors),
                           "bytes")
        targets = [(TYPES[t], partials.path(file)) for t, file in jobs]
        h = plan.hparams.text
        written = [(w.path, w.sha256) for w in write_quantized(
            targets, arch, metadata, tensors, files, n_layer=h.n_layer,
            is_70b=role == "language" and plan.family.language.is_70b(h), threads=job.threads, advance=advance,
            n_gqa=h.n_head // h.n_head_kv if role == "language" else 1, imatrix=imatrix)]
    ready = []
    for (type_name, file), (partial, digest) in zip(jobs, written):
        verify(partial, arch, expected)
        ready.append((role, type_name, partial, partial.parent / file, digest))
    return ready


def _via_llama_quantize(role, jobs, arch, metadata, tensors, files, partials, name, job: _Job, advance,
                        imatrix=None) -> list:
    """The reference route: the lossless GGUF, then llama.cpp's quantizer once per type."""
    intermediate = partials.path(f"{name}-lossless.gguf" if role == "language" else f"mmproj-{name}-lossless.gguf")
    job.progress.phase(f"write {role} (lossless)", sum(t.source.nbytes for t in tensors), "bytes")
    write_gguf(intermediate, arch, metadata, tensors, files, advance)
    written = []
    for type_name, file in jobs:
        partial = partials.path(file)
        job.progress.phase(f"quantize {file}", len(tensors), "tensors")
        quantize(intermediate, partial, type_name, threads=job.threads, verbose=job.verbose,
                 on_tensor=lambda i, n: job.progress.advance(i), imatrix=imatrix)
        written.append((partial, None))
    intermediate.unlink()  # free its disk space before the next role's intermediate
    return written
