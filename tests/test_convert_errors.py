"""Every bad input: one clear line naming the culprit, exit code 1, no traceback, nothing left behind,
existing outputs untouched."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from acestep_gguf.cli import app

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, *needles, out=None):
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output + result.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    if out is not None and out.exists():
        assert not list(out.glob("*.partial")), list(out.iterdir())


def edit_state(ckpt, change):
    path = ckpt / "model.safetensors"
    state = load_file(path)
    change(state)
    save_file(state, path)


def write_raw(path, header: dict, data: bytes, header_len: int | None = None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", header_len if header_len is not None else len(raw)) + raw + data)


def raw_header(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def test_pickle_checkpoints_are_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    assert_clean_failure(cli("convert", folder, "--out", tmp_path / "o"), "pytorch_model.bin", "safetensors")


@pytest.mark.parametrize("config,needle", [
    ({"_class_name": "ACEStepTransformer2DModel", "_diffusers_version": "0.32.0"}, "ACEStepTransformer2DModel"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "Qwen2ForCausalLM"),
    ({"architectures": ["Idefics2ForConditionalGeneration"], "model_type": "idefics2"}, "perceiver resampler"),
    ({"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
      "text_config": {"model_type": "gemma"}, "vision_config": {"model_type": "clip_vision_model"}},
     "text_config.model_type 'gemma'"),
    ({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
      "vision_config": {"model_type": "pixtral"}, "text_config": {"model_type": "mistral"}}, "must be 'full' for a Pixtral tower"),
])
def test_other_architectures_are_refused_by_name(tmp_path, fresh_checkpoint, config, needle):
    ckpt = fresh_checkpoint()
    (ckpt / "config.json").write_text(json.dumps(config))
    assert_clean_failure(cli("convert", ckpt, "--out", tmp_path / "o"), needle, "config.json")


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c["text_config"].update(model_type="gemma"), "text_config.model_type 'gemma'"),
    (lambda c: c.update(vision_feature_select_strategy="full"), "vision_feature_select_strategy"),
    (lambda c: c.update(vision_feature_layer=[-2, -5]), "vision_feature_layer"),
    (lambda c: c["vision_config"].update(hidden_act="relu"), "hidden_act"),
    (lambda c: c["text_config"].update(hidden_size=None), "text_config.hidden_size is missing"),
])
def test_bad_config_fields_are_named(tmp_path, fresh_checkpoint, edit, needle):
    ckpt = fresh_checkpoint()
    config = json.loads((ckpt / "config.json").read_text())
    edit(config)
    (ckpt / "config.json").write_text(json.dumps(config))
    assert_clean_failure(cli("convert", ckpt, "--out", tmp_path / "o"), needle)


@pytest.mark.parametrize("change,needle", [
    (lambda s: s.pop("language_model.model.layers.1.mlp.up_proj.weight"), "text.layers.1.mlp.up_proj.weight"),
    (lambda s: s.update({"language_model.model.layers.7.mlp.up_proj.weight": torch.zeros(2)}), "layers.7.mlp.up_proj"),
    (lambda s: s.update({"language_model.model.norm.weight": torch.ones(63)}), "shape [63]"),
    (lambda s: s.update({"language_model.model.norm.weight": torch.ones(64, dtype=torch.float64)}), "F64"),
    (lambda s: s["multi_modal_projector.linear_2.weight"].__setitem__((3, 4), float("nan")), "NaN"),
    (lambda s: s["vision_tower.encoder.layers.0.mlp.fc1.weight"].__setitem__((0, 0), float("inf")), "NaN or Inf"),
])
def test_bad_tensors_are_named(tmp_path, fresh_checkpoint, change, needle):
    ckpt = fresh_checkpoint()
    edit_state(ckpt, change)
    assert_clean_failure(cli("convert", ckpt, "--out", tmp_path / "o"), needle, out=tmp_path / "o")


def test_nan_in_a_bf16_checkpoint_is_found(tmp_path, fresh_checkpoint):
    ckpt = fresh_checkpoint(dtype=torch.bfloat16)
    edit_state(ckpt, lambda s: s["language_model.model.embed_tokens.weight"].__setitem__((5, 5), float("nan")))
    assert_clean_failure(cli("convert", ckpt, "--out", tmp_path / "o"), "embed_tokens.weight", "NaN",
                         out=tmp_path / "o")


@pytest.mark.parametrize("damage,needle", [
    ("truncate", "truncated"),
    ("header_len", "header length"),
    ("overlap", "overlaps"),
    ("span", "needs"),
    ("duplicate", "appears twice"),
    ("not_json", "not JSON"),
])
def test_malformed_safetensors_headers(tmp_path, fresh_checkpoint, damage, needle):
    ckpt = fresh_checkpoint()
    path = ckpt / "model.safetensors"
    header, data = raw_header(ckpt)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "header_len":
        write_raw(path, header, data, header_len=1 << 40)
    elif damage == "overlap":
        header[names[1]]["data_offsets"] = [header[names[1]]["data_offsets"][0] - 4, header[names[1]]["data_offsets"][1] - 4]
        write_raw(path, header, data)
    elif damage == "span":
        header[names[0]]["shape"] = [1]
        write_raw(path, header, data)
    elif damage == "duplicate":
        raw = json.dumps(header)
        first = json.dumps({names[0]: header[names[0]]})[1:-1]
        raw = "{" + first + ", " + raw[1:]
        path.write_bytes(struct.pack("<Q", len(raw)) + raw.encode() + data)
    elif damage == "not_json":
        path.write_bytes(struct.pack("<Q", 5) + b"{{{{{" + data)
    assert_clean_failure(cli("convert", ckpt, "--out", tmp_path / "o"), "model.safetensors", needle)


@pytest.mark.parametrize("damage,needle", [
    ("missing_shard", "missing"),
    ("two_shards", "two shards"),
    ("escape", "leaves the checkpoint folder"),
    ("unstored", "not stored"),
])
def test_inconsistent_shard_index(tmp_path, fresh_checkpoint, damage, needle):
    ckpt = fresh_checkpoint(shards=2)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard1, shard2 = sorted(set(index["weight_map"].values()))
    if damage == "missing_shard":
        (ckpt / shard2).unlink()
    elif damage == "two_shards":
        state1 = load_file(ckpt / shard1)
        state2 = load_file(ckpt / shard2)
        name = next(iter(state1))
        state2[name] = state1[name]
        save_file(state2, ckpt / shard2)
    elif damage == "escape":
        name = next(iter(index["weight_map"]))
        index["weight_map"][name] = "../outside.safetensors"
    elif damage == "unstored":
        index["weight_map"]["language_model.model.ghost.weight"] = shard1
    index_path.write_text(json.dumps(index))
    assert_clean_failure(cli("convert", ckpt, "--out", tmp_path / "o"), needle)


def test_missing_source_and_bad_options(tmp_path, fresh_checkpoint):
    assert_clean_failure(cli("convert", tmp_path / "nope", "--out", tmp_path / "o"), "no such folder")
    ckpt = fresh_checkpoint()
    assert_clean_failure(cli("convert", ckpt, "--quant", "Q3_X"), "Q3_X")
    assert_clean_failure(cli("convert", ckpt, "--mmproj-quant", "Q4_K_M"), "F16 or Q8_0")


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_a_failed_rerun_keeps_existing_outputs(tmp_path, fresh_checkpoint):
    ckpt = fresh_checkpoint()
    out = tmp_path / "out"
    assert cli("convert", ckpt, "--out", out, "--quant", "Q8_0", "--quiet").exit_code == 0
    before = digest(out)
    edit_state(ckpt, lambda s: s["language_model.model.layers.1.mlp.down_proj.weight"].__setitem__((1, 1), float("nan")))
    assert_clean_failure(cli("convert", ckpt, "--out", out, "--quant", "Q8_0", "--force"), "NaN", out=out)
    assert digest(out) == before


@pytest.mark.parametrize("route", ["one pass", "via llama quantize"])
def test_interrupted_quantization_leaves_nothing_behind(tmp_path, fresh_checkpoint, monkeypatch, route):
    from acestep_gguf.convert import one_pass, pipeline

    def interrupted(*args, **kwargs):  # after some bytes of the output are on disk
        raise KeyboardInterrupt

    if route == "one pass":
        monkeypatch.setattr(one_pass.Quantizer, "rows", interrupted)
    else:
        monkeypatch.setattr(pipeline, "quantize", lambda src, dst, *a, **k: dst.write_bytes(b"half") and interrupted())
    out = tmp_path / "out"
    result = cli("convert", fresh_checkpoint(), "--out", out, *(["--via-llama-quantize"] if route != "one pass" else []))
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert not out.exists()  # created by this run, removed again


def test_not_enough_disk_space_is_reported_before_writing(tmp_path, fresh_checkpoint, monkeypatch):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    out.mkdir()
    assert_clean_failure(cli("convert", fresh_checkpoint(), "--out", out), "0.0 MB free but", "needs about")
    assert list(out.iterdir()) == []  # an existing folder stays, empty


def test_a_file_where_the_output_folder_should_be(tmp_path, fresh_checkpoint):
    out = tmp_path / "locked"
    out.write_text("a file where the folder should be")
    assert_clean_failure(cli("convert", fresh_checkpoint(), "--out", out), str(out))
    assert out.read_text() == "a file where the folder should be"


def test_an_unwritable_output_folder(tmp_path, fresh_checkpoint):
    from hostile import read_only_view
    (tmp_path / "folder").mkdir()
    with read_only_view(tmp_path / "folder", tmp_path / "ro") as ro:  # permissions do not stop root; a mount does
        assert_clean_failure(cli("convert", fresh_checkpoint(), "--out", ro, "--quiet"), str(ro), "Read-only file system")
        assert list(ro.iterdir()) == []
