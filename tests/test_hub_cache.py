"""A sharded checkpoint as the Hugging Face cache really stores it — blobs, snapshot files that are
relative symlinks into ../../blobs, refs/main — converts offline by repo id and by snapshot path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from test_cli import cli

COMMIT = "3f1c0e5a9b7d2c4e6f8a0b1c2d3e4f5a6b7c8d9e"


@pytest.fixture()
def hub_cache(tmp_path, fresh_checkpoint, monkeypatch):
    """The tiny checkpoint, two shards, laid out as huggingface_hub's cache: (cache dir, snapshot dir)."""
    source = fresh_checkpoint("src", shards=2)
    hub = tmp_path / "hub"
    repo = hub / "models--acme--tiny-llava"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / COMMIT
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.move(f, blobs / digest)
        os.symlink(f"../../blobs/{digest}", snapshot / f.name)  # relative, exactly as the hub client makes them
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub, snapshot


def test_the_layout_is_what_huggingface_hub_itself_reads(hub_cache):
    from huggingface_hub import scan_cache_dir
    hub, snapshot = hub_cache
    info = scan_cache_dir(hub)
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "acme/tiny-llava" and [r.commit_hash for r in repo.revisions] == [COMMIT]
    names = {f.file_name for f in next(iter(repo.revisions)).files}
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json"} <= names
    assert all((snapshot / n).is_symlink() for n in names)


def test_a_sharded_cache_checkpoint_converts_offline_by_repo_id(tmp_path, hub_cache):
    result = cli("convert", "acme/tiny-llava", "--out", tmp_path / "o", "--quant", "Q8_0", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["name"] == "tiny-llava" and manifest["source"]["repo_id"] == "acme/tiny-llava"
    assert manifest["source"]["revision"] == COMMIT
    # file names, never the blob hashes the symlinks point to
    assert [f["file"] for f in manifest["source"]["files"]] == ["model-00001-of-00002.safetensors",
                                                                "model-00002-of-00002.safetensors"]
    assert "blobs" not in json.dumps(manifest)
    chat = cli("info", tmp_path / "o" / "tiny-llava-Q8_0.gguf", "--json")
    assert json.loads(chat.stdout)["check"].startswith("ok")


def test_the_snapshot_folder_converts_too_and_matches(tmp_path, hub_cache):
    _, snapshot = hub_cache
    by_path = cli("convert", snapshot, "--out", tmp_path / "a", "--quant", "F16", "--name", "m", "--json")
    by_id = cli("convert", "acme/tiny-llava", "--out", tmp_path / "b", "--quant", "F16", "--name", "m", "--json")
    assert by_path.exit_code == 0 and by_id.exit_code == 0, by_path.output + by_id.output
    for name in ("m-F16.gguf", "mmproj-m-F16.gguf"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    again = cli("convert", "acme/tiny-llava", "--out", tmp_path / "b", "--quant", "F16", "--name", "m")
    assert again.exit_code == 0 and "kept (unchanged) m-F16.gguf" in again.stderr  # fingerprint stable through links


def test_a_dangling_shard_link_is_named(tmp_path, hub_cache):
    hub, snapshot = hub_cache
    target = os.readlink(snapshot / "model-00002-of-00002.safetensors")
    (hub / "models--acme--tiny-llava" / "blobs" / os.path.basename(target)).unlink()  # an interrupted download
    result = cli("convert", "acme/tiny-llava", "--out", tmp_path / "o")
    assert result.exit_code == 1 and "model-00002-of-00002.safetensors: no such safetensors file" in result.stderr
