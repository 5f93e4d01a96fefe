"""Find the language model and mmproj to load, and refuse pairs llama.cpp would misuse."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFilesError
from ..manifest import MANIFEST, Manifest
from .gguf_header import read_header
from .images import PixelRecipe


# llama_ftype values → llama.cpp's type names, for files given by path.
FILE_TYPES = {0: "F32", 1: "F16", 7: "Q8_0", 15: "Q4_K_M", 17: "Q5_K_M", 32: "BF16"}


@dataclass(frozen=True)
class ModelFiles:
    model: Path
    mmproj: Path
    name: str
    quant: str


def read_fields(path: Path, role: str) -> dict:
    """Metadata of a GGUF file (long tokenizer arrays only counted), plus "__tensors__": name → shape."""
    header = read_header(path, role)
    return {**header.fields, "__tensors__": {t.name: list(t.shape) for t in header.tensors}}


def resolve(folder: str | Path | None = None, *, model: str | Path | None = None, mmproj: str | Path | None = None,
            quant: str | None = None, mmproj_quant: str | None = None) -> ModelFiles:
    """A converted folder (its manifest picks the files) or explicit paths."""
    if model is not None or mmproj is not None:
        if model is None or mmproj is None:
            raise ModelFilesError("give both model= and mmproj= (or a converted folder)")
        model, mmproj = Path(model).expanduser(), Path(mmproj).expanduser()
        ftype = read_fields(model, "language model").get("general.file_type")
        return ModelFiles(model, mmproj, model.stem, FILE_TYPES.get(ftype, str(ftype)))
    if folder is None:
        raise ModelFilesError("no model given: pass a converted folder, or model= and mmproj=")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelFilesError(f"{folder}: no such folder (convert a checkpoint first: acestep-gguf convert SOURCE)")
    manifest = Manifest.read(folder)
    lang = manifest.pick("language", quant.upper() if quant else None)
    vision = manifest.pick("vision", mmproj_quant.upper() if mmproj_quant else None)
    for entry in (lang, vision):
        if not (folder / entry.file).is_file():
            raise ModelFilesError(f"{folder / entry.file}: listed in {MANIFEST} but missing")
    return ModelFiles(folder / lang.file, folder / vision.file, manifest.name, lang.type)


def check_pair(model_fields: dict, mmproj_fields: dict, files: ModelFiles) -> None:
    """The projector must output vectors as wide as the language model's embeddings."""
    arch = model_fields.get("general.architecture")
    if arch == "clip":
        raise ModelFilesError(f"{files.model}: this is an mmproj (clip) file; pass it as mmproj")
    if mmproj_fields.get("general.architecture") != "clip":
        raise ModelFilesError(f"{files.mmproj}: not an mmproj file (general.architecture is "
                              f"{mmproj_fields.get('general.architecture')!r}, expected 'clip')")
    n_embd = model_fields.get(f"{arch}.embedding_length")
    out = mmproj_fields["__tensors__"].get("mm.2.bias", [mmproj_fields.get("clip.vision.projection_dim")])[0]
    if n_embd != out:
        raise ModelFilesError(f"{files.mmproj.name} projects images to width {out} but {files.model.name} has "
                              f"embedding width {n_embd}: they are not a pair")


def pixel_recipe(mmproj_fields: dict, path: Path) -> PixelRecipe:
    try:
        size = int(mmproj_fields["clip.vision.image_size"])
        patch = int(mmproj_fields["clip.vision.patch_size"])
    except KeyError as e:
        raise ModelFilesError(f"{path}: missing {e.args[0]}") from None
    return PixelRecipe(size, patch, int(mmproj_fields.get("acestep_gguf.image.resize_shortest_edge", size)),
                       int(mmproj_fields.get("acestep_gguf.image.resample", 3)))
