"""Every source tensor → exactly one output tensor or an explicit ignore; checked before writing."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import TensorError
from ..models.family import Family
from ..models.hparams import HParams
from ..models.spec import TensorSpec
from .checkpoint import Checkpoint
from .safetensors_file import NUMPY_VIEW, SourceTensor


@dataclass(frozen=True)
class PlannedTensor:
    spec: TensorSpec
    source: SourceTensor


@dataclass
class Plan:
    family: Family
    hparams: HParams
    language: list[PlannedTensor]
    vision: list[PlannedTensor]
    ignored: dict[str, str]  # stored source name -> reason


def canonical_name(name: str, replacements) -> str | None:
    """Apply the first (prefix, replacement) pair that matches; None when none does."""
    for prefix, canonical in replacements:
        if name.startswith(prefix):
            return canonical + name[len(prefix):]
    return None


def row_of(source: SourceTensor, row: int, shape: tuple[int, ...]) -> SourceTensor:
    """One row of a matrix, as a tensor of its own (the file's bytes, not a copy)."""
    if len(source.shape) != 2 or not 0 <= row < source.shape[0] or (source.shape[1],) != tuple(shape):
        raise TensorError(f"{source.file.name}: tensor {source.name!r} has no row {row} of width {shape[0]}")
    width = source.nbytes // source.shape[0]
    return replace(source, name=f"{source.name}[{row}]", shape=tuple(shape), start=source.start + row * width,
                   nbytes=width)


def make_plan(ckpt: Checkpoint, family: Family) -> Plan:
    """Match the checkpoint's tensors against the family's tables; any surprise is an error."""
    h = family.hparams(ckpt.config, ckpt.preprocessor, ckpt.tokenizer)
    specs = family.tensors(h)
    expected = {s.source_name: s for s in specs if s.row is None}
    ignorable = {i.source_name: i.reason for i in family.ignored(h)}
    found: dict[str, PlannedTensor] = {}
    ignored: dict[str, str] = {}
    for name, t in sorted(ckpt.tensors.items()):
        canonical = canonical_name(name, family.replacements)
        where = f"{t.file.name}: tensor {name!r}"
        if canonical in ignorable:
            ignored[name] = ignorable[canonical]
            continue
        spec = expected.get(canonical)
        if spec is None:
            raise TensorError(f"{where} is not part of the {family.name} layout that config.json describes "
                              "(unknown name, or a layer beyond num_hidden_layers)")
        if canonical in found:
            raise TensorError(f"{where} duplicates {found[canonical].source.name!r} (two name styles in one checkpoint)")
        if t.dtype not in NUMPY_VIEW:
            raise TensorError(f"{where} has dtype {t.dtype}; only BF16, F16 and F32 are supported")
        if t.shape != spec.shape:
            raise TensorError(f"{where} has shape {list(t.shape)} but config.json implies {list(spec.shape)}")
        found[canonical] = PlannedTensor(spec, t)
    missing = [s for s in expected if s not in found]
    if missing:
        raise TensorError(f"tensor {missing[0]!r} (in any name style) is missing from the checkpoint"
                          + (f", and {len(missing) - 1} more" if len(missing) > 1 else ""))
    rank = {name: i for i, name in enumerate(expected)}
    planned = sorted(found.values(), key=lambda p: rank[p.spec.source_name])
    planned += [PlannedTensor(s, row_of(found[s.source_name].source, s.row, s.shape)) for s in specs if s.row is not None]
    return Plan(family, h,
                [p for p in planned if p.spec.role == "language"],
                [p for p in planned if p.spec.role == "vision"],
                ignored)
