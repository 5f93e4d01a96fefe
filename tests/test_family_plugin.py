"""Adding a family is one Family value and one register() call: a third family declared here (a
Gemma language model — llama.cpp's `gemma` architecture — with the same CLIP + MLP vision half)
converts, loads, chats and plans without any change to the pipeline, runtime or planner code."""

from __future__ import annotations

import json

import pytest
from builders import build_model, save_checkpoint, tiny_config
from gguf import GGUFReader
from test_cli import cli
from transformers import GemmaConfig, LlavaConfig

from acestep_gguf import VisionChat, convert
from acestep_gguf.models import registry
from acestep_gguf.models.family import Family, LanguageModel

ACME_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{% for p in m['content'] %}{{ p['text'] }}{% endfor %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
ACME = Family(
    name="acme_gemma", architectures=("AcmeLlavaForConditionalGeneration",), description="Gemma + CLIP + MLP (test)",
    language=LanguageModel(gguf_arch="gemma", model_types=("gemma",), tokenizer="gpt2", qkv_bias=False,
                           builtin_template=ACME_TEMPLATE, config_defaults={"gemma": {}}))


@pytest.fixture()
def acme_registered(monkeypatch):
    monkeypatch.setattr(registry, "FAMILIES", list(registry.FAMILIES))  # undone after the test
    registry.register(ACME)


@pytest.fixture(scope="module")
def acme_checkpoint(tmp_path_factory, tokenizer):
    vision = tiny_config(tokenizer).vision_config
    text = GemmaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True,
                       eos_token_id=tokenizer.token_to_id("<|im_end|>"), bos_token_id=None, pad_token_id=None)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=tokenizer.token_to_id("<image>"),
                         vision_feature_layer=-2, projector_hidden_act="gelu", tie_word_embeddings=True)
    folder = save_checkpoint(build_model(config), tokenizer, tmp_path_factory.mktemp("acme") / "acme", template=None)
    edit = json.loads((folder / "config.json").read_text())
    edit["architectures"] = ["AcmeLlavaForConditionalGeneration"]
    (folder / "config.json").write_text(json.dumps(edit))
    return folder


def test_an_unregistered_family_is_refused_by_name(tmp_path, acme_checkpoint):
    result = cli("convert", acme_checkpoint, "--out", tmp_path / "o")
    assert result.exit_code == 1 and "AcmeLlavaForConditionalGeneration" in result.stderr


def test_a_registered_family_converts_chats_and_plans(tmp_path, acme_registered, acme_checkpoint, noise_image):
    manifest = convert(acme_checkpoint, out=tmp_path / "o", quant="Q8_0", name="acme")
    assert manifest.source["family"] == "acme_gemma"
    reader = GGUFReader(tmp_path / "o" / "acme-Q8_0.gguf")
    assert reader.fields["general.architecture"].contents() == "gemma"
    assert reader.fields["tokenizer.chat_template"].contents() == ACME_TEMPLATE
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied embeddings, as the family's tables say
    with VisionChat.load(tmp_path / "o", n_ctx=512) as chat:
        answer = chat.ask("What is in this picture?", images=[noise_image], max_tokens=6)
        assert chat.last_turn.images_encoded == 1 and chat.last_turn.completion_tokens >= 1 and isinstance(answer, str)
    plan = cli("plan", tmp_path / "o", "--vram", "4GiB", "--json")
    assert plan.exit_code == 0 and json.loads(plan.stdout)["n_layers"] == 2
    info = cli("info", tmp_path / "o" / "acme-Q8_0.gguf", "--json")
    assert json.loads(info.stdout)["check"].startswith("ok")
