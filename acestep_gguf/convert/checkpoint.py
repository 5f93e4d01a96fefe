"""Open a checkpoint (local folder or Hugging Face repo id): config, validated shards, tokenizer files.

Files inside the folder are opened as ``folder / name`` and never resolved: a Hugging Face cache
snapshot is a folder of relative symlinks into ``../../blobs/``, and that is a normal checkpoint."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..files import bare_name, exists, open_regular, read_json_object, read_text
from .safetensors_file import SourceTensor, read_header

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.txt", "*.model"]
FINGERPRINTED = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "chat_template.jinja", "chat_template.json", INDEX)


@dataclass
class Checkpoint:
    folder: Path
    config: dict
    preprocessor: dict
    tokenizer: dict
    tokenizer_config: dict
    chat_template: str | None
    tensors: dict[str, SourceTensor]
    source: dict = field(default_factory=dict)  # what the manifest records about where this came from


def open_checkpoint(source: str | os.PathLike) -> Checkpoint:
    """A validated view of the checkpoint; nothing but headers and JSON files is read."""
    path = Path(source).expanduser()
    if path.is_dir():
        folder, info = path.resolve(), {"path": str(path.resolve())}
    elif exists(path):
        raise CheckpointError(f"{path}: expected a checkpoint folder (with config.json), got a file")
    elif _looks_like_repo_id(str(source)):
        folder, info = _download(str(source))
    else:
        raise CheckpointError(f"{source}: no such folder, and not a Hugging Face repo id (owner/name)")
    config = _json(folder / "config.json", required=True)
    tensors, shards = _tensors(folder)
    tokenizer = _json(folder / "tokenizer.json", required=True)
    tokenizer_config = _json(folder / "tokenizer_config.json")
    info["files"] = [{"file": s.name, "bytes": os.stat(s).st_size} for s in shards]
    info["fingerprint"] = _fingerprint(folder, shards)
    return Checkpoint(folder, config, _json(folder / "preprocessor_config.json"), tokenizer, tokenizer_config,
                      _chat_template(folder, tokenizer_config), tensors, info)


def _looks_like_repo_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "~")) and ".." not in s


def _download(repo_id: str) -> tuple[Path, dict]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError)
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such Hugging Face repository (or it is private: run `hf auth login`)") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise CheckpointError(f"{repo_id}: not in the local Hugging Face cache and the hub cannot be reached "
                              "(HF_HUB_OFFLINE is set or there is no network); download it once while online") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{repo_id}: download failed: {str(e).splitlines()[0]}") from None
    return folder, {"repo_id": repo_id, "revision": folder.name}


def _json(path: Path, required: bool = False) -> dict:
    if not exists(path):
        if required:
            raise CheckpointError(f"{path}: missing (a Hugging Face checkpoint folder needs it)")
        return {}
    return read_json_object(path, ConfigError)


def _chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    """The checkpoint's template wherever transformers 4 or 5 put it (tokenizer_config, .jinja, .json)."""
    jinja = folder / "chat_template.jinja"
    if exists(jinja):
        return read_text(jinja, ConfigError, what="chat template")
    where, template = "tokenizer_config.json", tokenizer_config.get("chat_template")
    if template is None:
        where, template = "chat_template.json", _json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ConfigError(f"{where}: chat_template is {type(template).__name__}, expected a string")
    return template if template and template.strip() else None


def _shard_files(folder: Path) -> tuple[list[Path], dict | None]:
    index_path = folder / INDEX
    if exists(index_path):
        weight_map = _json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{INDEX}: 'weight_map' is missing or empty")
        shards = []
        for name in sorted({str(v) for v in weight_map.values()}):
            if not bare_name(name) or not name.endswith(".safetensors"):
                raise CheckpointError(f"{INDEX}: shard {name!r} leaves the checkpoint folder or is not a "
                                      ".safetensors file name")
            if not exists(folder / name):
                raise CheckpointError(f"{INDEX}: shard {name} is missing from {folder}")
            shards.append(folder / name)
        return shards, weight_map
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(f"{folder}: only pickle weights ({', '.join(pickles[:3])}) found; they can run "
                                  "code when loaded and are refused: convert them to safetensors first")
        raise CheckpointError(f"{folder}: no *.safetensors weights found")
    return shards, None


def _tensors(folder: Path) -> tuple[dict[str, SourceTensor], list[Path]]:
    shards, weight_map = _shard_files(folder)
    tensors: dict[str, SourceTensor] = {}
    for shard in shards:
        for name, t in read_header(shard).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} is in two shards: {tensors[name].file.name} and {shard.name}")
            if weight_map is not None and weight_map.get(name) != shard.name:
                raise CheckpointError(f"{INDEX}: tensor {name!r} is in {shard.name} but the index says "
                                      f"{weight_map.get(name, 'nothing')}")
            tensors[name] = t
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in tensors:
                raise CheckpointError(f"{INDEX}: tensor {name!r} is listed in {shard} but not stored there")
    return tensors, shards


def _fingerprint(folder: Path, shards: list[Path]) -> str:
    """Changes when the config or any shard changes: decides whether earlier outputs still match.
    Records file names, sizes and times, never where a symlink points (blob hashes)."""
    h = hashlib.sha256()
    for name in FINGERPRINTED:
        p = folder / name
        if exists(p):
            with open_regular(p, ConfigError) as f:
                h.update(name.encode() + f.read())
    for shard in shards:
        st = os.stat(shard)
        h.update(f"{shard.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
