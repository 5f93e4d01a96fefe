"""Find the language model and mmproj to load, and refuse pairs llama.cpp would misuse."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFValueType

from ..errors import ModelFilesError
from ..manifest import MANIFEST, Manifest
from ..model_store import ModelStore, looks_like_name
from ..models.registry import FAMILIES, for_gguf
from ..quant_types import name_of_file_type
from .gguf_header import read_header
from .images import PixelRecipe


@dataclass(frozen=True)
class ModelFiles:
    model: Path
    mmproj: Path
    name: str
    quant: str


def read_fields(path: Path, role: str) -> dict:
    """Metadata of a GGUF file (long tokenizer arrays only counted), plus "__tensors__": name → shape
    and "__types__": key → (value type, element type)."""
    return fields_of(read_header(path, role))


def fields_of(header) -> dict:
    return {**header.fields, "__tensors__": {t.name: list(t.shape) for t in header.tensors},
            "__types__": header.types}


def check_file(fields: dict, path: Path, role: str) -> None:
    """Refuse, with a line naming the file and the key or tensor, anything llama.cpp would abort or
    crash on: keys of the wrong type or out of range, a vocabulary with a repeated token text,
    missing or mis-shaped tensors (the clip loader dereferences missing ones)."""
    arch = fields.get("general.architecture")
    if role == "language" and arch == "clip":
        raise ModelFilesError(f"{path}: this is an mmproj (clip) file; pass the language model (or the folder)")
    if role == "vision" and arch != "clip":
        raise ModelFilesError(f"{path}: not an mmproj file (general.architecture is {arch!r}, expected 'clip')")
    family = for_gguf(fields, role)
    if family is None:
        key = "clip.projector_type" if role == "vision" else "general.architecture"
        known = ", ".join(sorted({f.projector_type if role == "vision" else f.gguf_arch for f in FAMILIES}))
        raise ModelFilesError(f"{path}: {key} {fields.get(key)!r} is not supported (supported: {known})")
    for key, rule in family.keys(role).items():
        problem = _key_problem(fields, key, rule)
        if problem:
            raise ModelFilesError(f"{path}: {key} {problem}")
    if role == "language":
        _check_vocabulary(fields, path)
    h = family.gguf_hparams(fields, fields["__tensors__"], role)
    for problem in family.gguf_problems(h, fields, role):
        raise ModelFilesError(f"{path}: {problem}")
    tensors = fields["__tensors__"]
    for spec in family.role_tensors(h, role):
        want = list(reversed(spec.shape))
        if spec.gguf_name not in tensors:
            raise ModelFilesError(f"{path}: tensor {spec.gguf_name} is missing (llama.cpp needs it)")
        if tensors[spec.gguf_name] != want:
            raise ModelFilesError(f"{path}: tensor {spec.gguf_name} has shape {tensors[spec.gguf_name]}, the "
                                  f"metadata implies {want}")


def _key_problem(fields: dict, key: str, rule) -> str | None:
    vtype, etype, required, bounds = rule
    if key not in fields:
        return "is missing" if required else None
    have_type, have_etype = fields["__types__"][key]
    if have_type != vtype or (etype is not None and have_etype != etype):
        want = vtype.name + (f" of {etype.name}" if etype is not None else "")
        got = have_type.name + (f" of {have_etype.name}" if have_etype is not None else "")
        return f"is {got}, llama.cpp needs {want}"
    value = fields[key]
    if bounds is not None:
        amount = value if vtype != GGUFValueType.ARRAY else (len(value) if isinstance(value, list) else value.count)
        if not bounds[0] <= amount <= bounds[1]:
            return f"is {amount}, outside {bounds[0]}..{bounds[1]}"
    return None


def _check_vocabulary(fields: dict, path: Path) -> None:
    tokens = fields["tokenizer.ggml.tokens"]
    n = len(tokens) if isinstance(tokens, list) else tokens.count
    duplicate = _first_duplicate(tokens) if isinstance(tokens, list) else tokens.duplicate
    if duplicate:
        raise ModelFilesError(f"{path}: token text {duplicate} (llama.cpp aborts on a repeated token text)")
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        if key in fields:
            m = len(fields[key]) if isinstance(fields[key], list) else fields[key].count
            if m < n:
                raise ModelFilesError(f"{path}: {key} has {m} entries for {n} tokens")
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.padding_token_id"):
        value = fields.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n):
            raise ModelFilesError(f"{path}: {key} {value!r} is not a token id (0..{n - 1})")


def _first_duplicate(tokens: list[str]) -> str | None:
    seen: dict[str, int] = {}
    for i, text in enumerate(tokens):
        if text in seen:
            return f"{text!r} at {seen[text]} and {i}"
        seen[text] = i
    return None


def resolve(folder: str | Path | None = None, *, model: str | Path | None = None, mmproj: str | Path | None = None,
            quant: str | None = None, mmproj_quant: str | None = None) -> ModelFiles:
    """A converted folder (its manifest picks the files) or explicit paths."""
    if model is not None or mmproj is not None:
        if model is None or mmproj is None:
            raise ModelFilesError("give both model= and mmproj= (or a converted folder)")
        model, mmproj = Path(model).expanduser(), Path(mmproj).expanduser()
        ftype = read_fields(model, "language model").get("general.file_type")
        return ModelFiles(model, mmproj, model.stem, name_of_file_type(ftype))
    if folder is None:
        raise ModelFilesError("no model given: pass a converted folder, a model name, or model= and mmproj=")
    folder, quant = store_reference(folder, quant)
    if not folder.is_dir():
        raise ModelFilesError(f"{folder}: no such folder (convert a checkpoint first: acestep-gguf convert SOURCE)")
    manifest = Manifest.read(folder)
    lang = manifest.pick("language", quant.upper() if quant else None)
    vision = manifest.pick("vision", mmproj_quant.upper() if mmproj_quant else None)
    for entry in (lang, vision):
        if not (folder / entry.file).is_file():
            raise ModelFilesError(f"{folder / entry.file}: listed in {MANIFEST} but missing")
    return ModelFiles(folder / lang.file, folder / vision.file, manifest.name, lang.type)


def store_reference(reference, quant: str | None = None) -> tuple[Path, str | None]:
    """A folder as given, or — when no such path exists — a model of the store by 'name' or
    'name:TYPE' (an explicit ``quant`` must agree with the TYPE)."""
    path = Path(reference).expanduser()
    if path.exists() or not looks_like_name(str(reference)):
        return path, quant
    folder, tag = ModelStore().resolve(str(reference))
    if quant and tag and quant.upper() != tag:
        raise ModelFilesError(f"{reference}: names type {tag} but {quant} was asked for")
    return folder, quant or tag


def check_pair(model_fields: dict, mmproj_fields: dict, files: ModelFiles) -> None:
    """Each file checked on its own, then: the projector outputs vectors as wide as the embeddings."""
    check_file(model_fields, files.model, "language")
    check_file(mmproj_fields, files.mmproj, "vision")
    arch = model_fields["general.architecture"]
    n_embd, out = model_fields[f"{arch}.embedding_length"], mmproj_fields["clip.vision.projection_dim"]
    if n_embd != out:
        raise ModelFilesError(f"{files.mmproj.name} projects images to width {out} but {files.model.name} has "
                              f"embedding width {n_embd}: they are not a pair")


def pixel_recipe(mmproj_fields: dict, path: Path) -> PixelRecipe:
    """How to shape pixels for this mmproj (fields already checked by check_file)."""
    size, patch = mmproj_fields["clip.vision.image_size"], mmproj_fields["clip.vision.patch_size"]
    shortest = mmproj_fields.get("acestep_gguf.image.resize_shortest_edge", size)
    if shortest < size:
        raise ModelFilesError(f"{path}: acestep_gguf.image.resize_shortest_edge {shortest} is below image_size {size}")
    tower = for_gguf(mmproj_fields, "vision").vision
    h = tower.gguf_hparams(mmproj_fields)
    return PixelRecipe(size, patch, shortest, mmproj_fields.get("acestep_gguf.image.resample", 3),
                       image_tokens=tower.max_image_tokens(h), **tower.pixel_strategy(h))
