"""Language-model hyper-parameters read as transformers reads them: every config below is written to a
folder in one of the layouts real checkpoints use (transformers 5 ``save_pretrained``: rope in
``rope_parameters``; transformers 4 hub files: top-level ``rope_theta`` and ``rope_scaling``, sparse
text configs), loaded by ``transformers.AutoConfig``, and each field compared with what the family
reads from the same file."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig, MistralConfig, Qwen2Config

from acestep_gguf import convert
from acestep_gguf.errors import ConfigError
from acestep_gguf.models.registry import detect

SIZES = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096)
VISION = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
          "num_attention_heads": 2, "image_size": 56, "patch_size": 14}
KINDS = {"qwen2": Qwen2Config, "llama": LlamaConfig, "mistral": MistralConfig}


def saved5(model_type: str, top: dict | None = None, **text) -> dict:
    """config.json as transformers 5's save_pretrained writes it."""
    config = LlavaConfig(text_config=KINDS[model_type](**{**SIZES, **text}), vision_config=CLIPVisionConfig(**{
        k: v for k, v in VISION.items() if k != "model_type"}), **(top or {}))
    config.architectures = ["LlavaForConditionalGeneration"]
    return json.loads(config.to_json_string())


def hub4(model_type: str, top: dict | None = None, **text) -> dict:
    """config.json in transformers 4's style: only what differs from the defaults, legacy rope keys."""
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "vision_config": VISION,
            "text_config": {"model_type": model_type, **SIZES, **text}, **(top or {})}


def transformers_reads(tmp_path, config: dict) -> dict:
    """The same fields as transformers holds them after AutoConfig.from_pretrained."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    c = AutoConfig.from_pretrained(tmp_path)
    t = c.text_config
    rope = t.rope_parameters
    kind = rope.get("rope_type", "default")
    scaling = None if kind == "default" else {"type": kind, "factor": rope["factor"], **(
        {"original_max_position_embeddings": rope["original_max_position_embeddings"]} if kind == "yarn" else {})}
    layer_types = getattr(t, "layer_types", None)
    window = getattr(t, "sliding_window", None)
    if t.model_type == "qwen2" and not (layer_types and "sliding_attention" in layer_types):
        window = None
    return {"rope_theta": rope["rope_theta"], "rope_scaling": scaling, "tie_word_embeddings": c.tie_word_embeddings,
            "head_dim": getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
            "n_head_kv": t.num_key_value_heads, "n_embd": t.hidden_size, "max_pos": t.max_position_embeddings,
            "sliding_window": window if t.model_type != "llama" else None, "n_ff": t.intermediate_size,
            "n_layer": t.num_hidden_layers, "n_head": t.num_attention_heads, "n_vocab": t.vocab_size,
            "rms_eps": t.rms_norm_eps}


def we_read(config: dict) -> dict:
    h = detect(config).hparams(config, {}).text
    return {k: getattr(h, k) for k in ("rope_theta", "rope_scaling", "tie_word_embeddings", "head_dim", "n_head_kv", "n_embd",
                              "max_pos", "sliding_window", "n_ff", "n_layer", "n_head", "n_vocab", "rms_eps")}


YARN = {"factor": 4.0, "original_max_position_embeddings": 32768}
CASES = {
    # transformers 5: rope_parameters only (the reported defect: the theta was ignored)
    "t5 qwen2 theta 1e6": lambda: saved5("qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "t5 mistral theta 1e6": lambda: saved5("mistral", rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "t5 llama theta 5e5": lambda: saved5("llama", rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
    "t5 pixtral-scale theta": lambda: saved5("mistral", rope_parameters={"rope_type": "default", "rope_theta": 1e9}),
    "t5 qwen2.5 yarn": lambda: saved5("qwen2", rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, **YARN}),
    "t5 linear": lambda: saved5("llama", rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
    "t5 default theta": lambda: saved5("qwen2"),
    # transformers 4 hub layout
    "t4 qwen2.5 yarn": lambda: hub4("qwen2", rope_theta=1e6, rope_scaling={"type": "yarn", **YARN}),
    "t4 yarn without original length": lambda: hub4("qwen2", rope_theta=1e6, rope_scaling={"type": "yarn", "factor": 2.0}),
    "t4 rope_type key": lambda: hub4("llama", rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "t4 theta only": lambda: hub4("mistral", rope_theta=1e6),
    "t4 nothing": lambda: hub4("llama"),
    "t4 sparse llama (llava-1.5-7b-hf)": lambda: {**hub4("llama"), "text_config": {
        "model_type": "llama", "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "vocab_size": 32064}},
    "t4 sparse mistral (bakLlava)": lambda: {**hub4("mistral"), "text_config": {"model_type": "mistral",
                                                                                  "vocab_size": 32002}},
    "t4 null scaling": lambda: hub4("qwen2", rope_theta=1e6, rope_scaling=None),
    # rope_scaling replaces rope_parameters; the top-level theta fills a dict that has none
    "both, scaling wins": lambda: hub4("qwen2", rope_theta=2e6, rope_parameters={"rope_type": "default", "rope_theta": 3e6},
                                       rope_scaling={"type": "yarn", **YARN}),
    "top-level original length": lambda: hub4("qwen2", rope_theta=1e6, original_max_position_embeddings=8192,
                                              rope_scaling={"type": "yarn", "factor": 4.0}),
    # head_dim, kv heads, tying, windows
    "explicit head_dim": lambda: hub4("mistral", head_dim=32),
    "null head_dim": lambda: saved5("llama", head_dim=None),
    "null kv heads": lambda: hub4("llama", num_key_value_heads=None),
    "tied at the top only": lambda: hub4("qwen2", top={"tie_word_embeddings": True}),
    "tied in text_config only": lambda: hub4("qwen2", tie_word_embeddings=True),
    "t5 tied": lambda: saved5("qwen2", tie_word_embeddings=True),
    "mistral default window": lambda: hub4("mistral"),
    "mistral v0.2 no window": lambda: hub4("mistral", sliding_window=None),
    "qwen2 window off": lambda: hub4("qwen2", use_sliding_window=False, sliding_window=131072),
    "qwen2 window on": lambda: hub4("qwen2", use_sliding_window=True, sliding_window=1024, max_window_layers=2),
    "qwen2 window on, no layer past max": lambda: hub4("qwen2", use_sliding_window=True, sliding_window=1024,
                                                       max_window_layers=28),
    "t5 qwen2 window on": lambda: saved5("qwen2", use_sliding_window=True, sliding_window=1024, max_window_layers=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_field_reads_as_transformers_reads_it(tmp_path, case):
    config = CASES[case]()
    assert we_read(config) == transformers_reads(tmp_path, config)


def test_the_cases_reach_every_rule(tmp_path):
    """The table is not vacuous: the thetas, scalings, windows and tyings really differ across it."""
    seen = [we_read(CASES[c]()) for c in CASES]
    assert {r["rope_theta"] for r in seen} >= {1e4, 5e5, 1e6, 2e6, 1e9}
    assert {(r["rope_scaling"] or {}).get("type") for r in seen} == {None, "yarn", "linear"}
    assert {r["sliding_window"] for r in seen} == {None, 1024, 4096}
    assert {r["tie_word_embeddings"] for r in seen} == {True, False}


@pytest.mark.parametrize("bad,message", [
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "beta_fast": 16}}, "beta_fast 16 is not supported"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "attention_factor": 0.5}}, "attention_factor is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e6"}}, "rope_theta is '1e6'"),
    ({"rope_parameters": {"full_attention": {"rope_theta": 1e6}}}, "per-layer-type rope"),
    ({"head_dim": 0}, "head_dim is 0"),
    ({"use_sliding_window": True, "layer_types": "sliding"}, "layer_types must list"),
])
def test_rope_and_window_fields_that_cannot_be_honoured_are_one_line(bad, message):
    with pytest.raises(ConfigError, match=message):
        we_read(hub4("qwen2", **bad))


def test_a_transformers_5_theta_reaches_the_gguf_for_both_families(tmp_path, fresh_checkpoint):
    """The reported defect end to end: the demo-style checkpoint saved by transformers 5 with
    rope_parameters.rope_theta 1e6 converts to freq_base 1e6 (it was 10000)."""
    from gguf import GGUFReader
    ckpt = fresh_checkpoint()
    config = json.loads((ckpt / "config.json").read_text())
    assert "rope_theta" not in config["text_config"] and "rope_parameters" in config["text_config"]
    config["text_config"]["rope_parameters"]["rope_theta"] = 1_000_000.0
    (ckpt / "config.json").write_text(json.dumps(config))
    convert(ckpt, out=tmp_path / "o", quant="F16", name="m")
    reader = GGUFReader(tmp_path / "o" / "m-F16.gguf")
    assert reader.fields["qwen2.rope.freq_base"].contents() == pytest.approx(1e6)
