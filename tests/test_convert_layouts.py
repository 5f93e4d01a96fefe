"""Every supported layout converts, and the three tensor-name styles give identical GGUF tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from builders import build_model, save_checkpoint, tiny_config
from gguf import GGUFReader
from gguf.quants import dequantize

from acestep_gguf import convert


def tensors(path):
    reader = GGUFReader(path)
    return {t.name: (int(t.tensor_type), tuple(int(d) for d in t.shape), bytes(t.data.tobytes())) for t in reader.tensors}


def values(path, name):
    t = next(t for t in GGUFReader(path).tensors if t.name == name)
    return dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))


@pytest.mark.parametrize("style,shards", [("hub4", 1), ("memory5", 3), ("saved5", 2)])
def test_name_styles_give_identical_tensors(tmp_path, converted, fresh_checkpoint, style, shards):
    ckpt = fresh_checkpoint(style, style=style, shards=shards)
    if shards > 1:
        assert (ckpt / "model.safetensors.index.json").exists()
    manifest = convert(ckpt, out=tmp_path / "out", quant="F16", name="tiny-llava")
    assert [f.file for f in manifest.files] == ["tiny-llava-F16.gguf", "mmproj-tiny-llava-F16.gguf"]
    for file in ("tiny-llava-F16.gguf", "mmproj-tiny-llava-F16.gguf"):
        assert tensors(tmp_path / "out" / file) == tensors(converted / file), f"{style}: {file} differs"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_source_dtypes_convert_faithfully(tmp_path, tiny_model, fresh_checkpoint, dtype):
    ckpt = fresh_checkpoint(str(dtype), dtype=dtype)
    convert(ckpt, out=tmp_path / "out", quant="F16,BF16", mmproj_quant="F16", name="m")
    source = tiny_model.state_dict()
    for file, gguf_name, src_name in [
        ("m-F16.gguf", "blk.1.ffn_down.weight", "model.language_model.layers.1.mlp.down_proj.weight"),
        ("m-BF16.gguf", "blk.0.attn_q.weight", "model.language_model.layers.0.self_attn.q_proj.weight"),
        ("m-F16.gguf", "blk.0.attn_q.bias", "model.language_model.layers.0.self_attn.q_proj.bias"),
        ("mmproj-m-F16.gguf", "v.blk.1.ffn_up.weight", "model.vision_tower.encoder.layers.1.mlp.fc1.weight"),
        ("mmproj-m-F16.gguf", "mm.2.weight", "model.multi_modal_projector.linear_2.weight"),
        ("mmproj-m-F16.gguf", "v.class_embd", "model.vision_tower.embeddings.class_embedding"),
    ]:
        expected = source[src_name].to(dtype).float().numpy()
        got = values(tmp_path / "out" / file, gguf_name)
        # the source dtype's own rounding, then F16/BF16 storage of matrices (vectors stay F32)
        tol = 1e-2 if "BF16" in file or dtype == torch.bfloat16 else 1e-3
        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * 0.1, err_msg=f"{file}:{gguf_name}")


def test_tied_embeddings_write_no_output_tensor(tmp_path, tokenizer):
    model = build_model(tiny_config(tokenizer, tie=True))
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "tied")
    assert json.loads((ckpt / "config.json").read_text())["tie_word_embeddings"] is True
    convert(ckpt, out=tmp_path / "out", quant="F16", name="t")
    names = {t.name for t in GGUFReader(tmp_path / "out" / "t-F16.gguf").tensors}
    assert "token_embd.weight" in names and "output.weight" not in names


def test_lm_head_present_but_tied_is_ignored(tmp_path, tokenizer):
    model = build_model(tiny_config(tokenizer, tie=True))
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "tied")
    from safetensors.torch import load_file, save_file
    state = load_file(ckpt / "model.safetensors")
    state["language_model.lm_head.weight"] = state["language_model.model.embed_tokens.weight"].clone()
    save_file(state, ckpt / "model.safetensors")
    convert(ckpt, out=tmp_path / "out", quant="F16", name="t")
    assert "output.weight" not in {t.name for t in GGUFReader(tmp_path / "out" / "t-F16.gguf").tensors}


def test_vision_layers_after_the_feature_layer_are_not_written(converted):
    reader = GGUFReader(converted / "mmproj-tiny-llava-F16.gguf")
    names = {t.name for t in reader.tensors}
    # 3 CLIP layers, vision_feature_layer -2: llava reads the output of layer 2 (index 1)
    assert "v.blk.1.ffn_down.weight" in names and not any(n.startswith("v.blk.2.") for n in names)
    assert "v.post_ln.weight" not in names
    assert reader.fields["clip.vision.block_count"].contents() == 2
    assert reader.fields["clip.vision.feature_layer"].contents() == [2]
