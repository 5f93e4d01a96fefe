"""What the GGUF files say about the model: hyper-parameters, rope scaling, tokenizer, template, vision."""

from __future__ import annotations

import json

import pytest
from builders import TEXT_ONLY_TEMPLATE
from gguf import GGUFReader

from acestep_gguf import convert
from acestep_gguf.templates import MEDIA_MARKER


def fields(path) -> dict:
    reader = GGUFReader(path)
    out = {}
    for key, field in reader.fields.items():
        out[key] = len(field.data) if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges") else field.contents()
    return out


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_language_metadata(converted, tokenizer):
    f = fields(converted / "tiny-llava-F16.gguf")
    assert f["general.architecture"] == "qwen2"
    assert (f["qwen2.block_count"], f["qwen2.embedding_length"], f["qwen2.feed_forward_length"]) == (2, 64, 128)
    assert (f["qwen2.attention.head_count"], f["qwen2.attention.head_count_kv"]) == (4, 2)
    assert f["qwen2.context_length"] == 1024 and "qwen2.rope.scaling.type" not in f
    assert f["qwen2.rope.freq_base"] == pytest.approx(10000.0)  # from transformers-5 rope_parameters
    assert f["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
    assert f["tokenizer.ggml.tokens"] == 320  # 300-token vocabulary padded to the 320 embedding rows
    assert f["tokenizer.ggml.eos_token_id"] == tokenizer.token_to_id("<|im_end|>")
    assert f["tokenizer.ggml.padding_token_id"] == tokenizer.token_to_id("<|endoftext|>")
    assert "tokenizer.ggml.bos_token_id" not in f and f["tokenizer.ggml.add_bos_token"] is False


def test_token_types_and_padding(converted, tokenizer):
    reader = GGUFReader(converted / "tiny-llava-F16.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    text = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    im_start = tokenizer.token_to_id("<|im_start|>")
    assert text[im_start] == "<|im_start|>" and types[im_start] == 3  # CONTROL
    assert types[100] == 1 and text[100] == tokenizer.id_to_token(100)  # NORMAL
    assert text[310] == "[PAD310]" and types[310] == 5  # UNUSED padding rows


def test_yarn_rope_scaling_sets_128k_context(tmp_path, fresh_checkpoint):
    ckpt = fresh_checkpoint()
    edit_json(ckpt / "config.json", lambda c: c["text_config"].update(
        max_position_embeddings=32768, rope_theta=1000000.0, rope_parameters=None,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}))
    convert(ckpt, out=tmp_path / "o", quant="F16", name="m")
    f = fields(tmp_path / "o" / "m-F16.gguf")
    assert f["qwen2.context_length"] == 131072
    assert (f["qwen2.rope.scaling.type"], f["qwen2.rope.scaling.factor"]) == ("yarn", 4.0)
    assert f["qwen2.rope.scaling.original_context_length"] == 32768
    assert f["qwen2.rope.freq_base"] == pytest.approx(1e6)


def test_checkpoint_template_is_kept_when_it_renders_image_parts(converted):
    f = fields(converted / "tiny-llava-F16.gguf")
    assert "part['type'] == 'image'" in f["tokenizer.chat_template"]  # the checkpoint's own (builders.HF_TEMPLATE)


def test_text_only_template_is_replaced_by_builtin_chatml(tmp_path, fresh_checkpoint):
    ckpt = fresh_checkpoint(template=TEXT_ONLY_TEMPLATE)
    convert(ckpt, out=tmp_path / "o", quant="F16", name="m")
    template = fields(tmp_path / "o" / "m-F16.gguf")["tokenizer.chat_template"]
    assert template != TEXT_ONLY_TEMPLATE and MEDIA_MARKER in template and "system" not in template


def test_template_in_chat_template_jinja_is_found(tmp_path, fresh_checkpoint):
    ckpt = fresh_checkpoint(template=None)
    (ckpt / "chat_template.jinja").write_text("{# transformers 5 file #}" + json.loads(json.dumps(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for p in m['content'] %}{{ '<image>' if p.type == 'image' "
            "else p['text'] }}{% endfor %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")))
    convert(ckpt, out=tmp_path / "o", quant="F16", name="m")
    assert fields(tmp_path / "o" / "m-F16.gguf")["tokenizer.chat_template"].startswith("{# transformers 5 file #}")


def test_vision_metadata(converted):
    f = fields(converted / "mmproj-tiny-llava-F16.gguf")
    assert f["general.architecture"] == "clip" and f["clip.projector_type"] == "mlp"
    assert f["clip.has_vision_encoder"] is True and f["clip.use_gelu"] is True  # hidden_act "gelu"
    assert (f["clip.vision.image_size"], f["clip.vision.patch_size"], f["clip.vision.embedding_length"]) == (56, 14, 32)
    assert (f["clip.vision.projection_dim"], f["clip.vision.block_count"], f["clip.vision.feature_layer"]) == (64, 2, [2])
    assert f["clip.vision.image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert f["acestep_gguf.image.resize_shortest_edge"] == 56


def test_quick_gelu_and_custom_normalisation(tmp_path, fresh_checkpoint):
    ckpt = fresh_checkpoint(preprocessor={"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25],
                                          "size": {"shortest_edge": 64}, "crop_size": 56})
    edit_json(ckpt / "config.json", lambda c: c["vision_config"].update(hidden_act="quick_gelu"))
    convert(ckpt, out=tmp_path / "o", quant="F16", name="m")
    f = fields(tmp_path / "o" / "mmproj-m-F16.gguf")
    assert "clip.use_gelu" not in f  # llama.cpp's default activation is quick GELU
    assert f["clip.vision.image_std"] == pytest.approx([0.25] * 3)
    assert f["acestep_gguf.image.resize_shortest_edge"] == 64


def test_clip_defaults_without_preprocessor_config(tmp_path, fresh_checkpoint):
    ckpt = fresh_checkpoint()
    (ckpt / "preprocessor_config.json").unlink()
    convert(ckpt, out=tmp_path / "o", quant="F16", name="m")
    assert fields(tmp_path / "o" / "mmproj-m-F16.gguf")["clip.vision.image_std"] == pytest.approx(
        [0.26862954, 0.26130258, 0.27577711])


def test_general_type_names_each_file(converted):
    assert fields(converted / "tiny-llava-F16.gguf")["general.type"] == "model"
    assert fields(converted / "tiny-llava-Q8_0.gguf")["general.type"] == "model"
    assert fields(converted / "mmproj-tiny-llava-F16.gguf")["general.type"] == "mmproj"


def test_no_bf16_tensor_reaches_the_mmproj(tmp_path, fresh_checkpoint):
    """GPU backends support BF16 unevenly; tensors llama.cpp's quantizer leaves alone (the position
    embeddings) used to stay BF16 in the "F16" mmproj of a BF16 checkpoint."""
    import torch
    from gguf import GGMLQuantizationType as Q
    ckpt = fresh_checkpoint(dtype=torch.bfloat16)
    convert(ckpt, out=tmp_path / "o", quant="Q8_0", mmproj_quant="F16", name="m")
    types = {t.name: t.tensor_type for t in GGUFReader(tmp_path / "o" / "mmproj-m-F16.gguf").tensors}
    assert Q.BF16 not in types.values(), {n: t.name for n, t in types.items() if t == Q.BF16}
    assert types["v.position_embd.weight"] in (Q.F16, Q.F32) and types["v.blk.0.attn_q.weight"] == Q.F16


def test_size_labels_as_llama_cpp_writes_them(converted, tiny_model):
    from gguf.utility import size_label
    n_vision = sum(p.numel() for n, p in tiny_model.named_parameters()  # the last CLIP layer is never run: not written
                   if ("vision" in n or "projector" in n) and "encoder.layers.2." not in n and "post_layernorm" not in n)
    n_language = sum(p.numel() for n, p in tiny_model.named_parameters() if "language_model" in n or n.startswith("lm_head"))
    assert fields(converted / "tiny-llava-F16.gguf")["general.size_label"] == size_label(n_language, 0, 0, 0) == "115K"
    assert fields(converted / "mmproj-tiny-llava-F16.gguf")["general.size_label"] == size_label(n_vision, 0, 0, 0)
