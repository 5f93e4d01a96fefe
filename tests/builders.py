"""Real tiny checkpoints for the tests: a transformers LlavaForConditionalGeneration (Qwen2 + CLIP +
MLP) with a byte-level BPE tokenizer using Qwen2's pre-tokenizer, saved in any of the name styles."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig,
                          Qwen2Config)

from acestep_gguf.convert.plan import canonical_name
from acestep_gguf.convert.tokenizer import QWEN2_SPLIT

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
CORPUS = [
    "What is in this picture? A red circle on a white background.",
    "How many shapes are there? Two. Three. One. Four.",
    "Describe this image. Compare these two images. What colour is the car?",
    "The quick brown fox jumps over the lazy dog 0123456789 times!",
    "green blue yellow purple orange square triangle circle grey light",
] * 20
HF_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT_ONLY_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 300, specials: list[str] = SPECIALS) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def tiny_config(tokenizer: Tokenizer, *, n_vocab: int = 320, tie: bool = False, vision_act: str = "gelu",
                image_size: int = 56, feature_layer: int = -2, text_layers: int = 2, hidden: int = 64,
                rope_theta: float = 10_000.0, image_token: str = "<image>") -> LlavaConfig:
    text = Qwen2Config(vocab_size=n_vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                       rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                       num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                       eos_token_id=tokenizer.token_to_id("<|im_end|>"), bos_token_id=None)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=image_size, patch_size=14, hidden_act=vision_act)
    return LlavaConfig(text_config=text, vision_config=vision, image_token_index=tokenizer.token_to_id(image_token),
                       vision_feature_layer=feature_layer, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", tie_word_embeddings=tie)


# llava-hf/llava-1.5-7b-hf's own chat template (images first via selectattr, "<image>\n", transformers'
# {% generation %} tag around replies): kept by the converter and rendered as transformers renders it.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAMA_TOKENIZER_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                          "add_bos_token": True, "add_eos_token": False, "legacy": True,
                          "tokenizer_class": "LlamaTokenizer", "chat_template": LLAVA_HF_TEMPLATE}


def tiny_llama_config(tokenizer: Tokenizer, text: str = "llama", n_vocab: int = 32064,
                      rope_theta: float = 10_000.0) -> LlavaConfig:
    """LLaVA-1.5 (text='llama') or BakLLaVA (text='mistral') at toy size, with Llama's real vocabulary."""
    kind = {"llama": LlamaConfig, "mistral": MistralConfig}[text]
    extra = {"sliding_window": None} if text == "mistral" else {}
    extra["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    text_config = kind(vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2 if text == "mistral" else 4,
                       max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=tokenizer.token_to_id("<pad>"), **extra)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=56, patch_size=14, hidden_act="quick_gelu")
    return LlavaConfig(text_config=text_config, vision_config=vision, image_token_index=tokenizer.token_to_id("<image>"),
                       vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")


def build_model(config: LlavaConfig, seed: int = 0, cls=LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # default init leaves norms at 1 and biases at 0: perturb so conversion errors show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def style_names(state: dict, style: str) -> dict:
    """Rename transformers-5 in-memory names into one of the three on-disk styles."""
    rules = {
        "memory5": [],
        "saved5": [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                   ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                   ("model.image_newline", "image_newline")],
        "hub4": [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                 ("model.vision_tower.", "vision_tower.vision_model."),
                 ("model.multi_modal_projector.", "multi_modal_projector."), ("model.image_newline", "image_newline")],
    }[style]
    return {canonical_name(name, rules) or name: tensor for name, tensor in state.items()}


def save_checkpoint(model: LlavaForConditionalGeneration, tokenizer: Tokenizer, folder: Path, *, style: str = "saved5",
                    dtype: torch.dtype = torch.float32, shards: int = 1, template: str | None = HF_TEMPLATE,
                    preprocessor: dict | None = None, tokenizer_config: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.get_text_config().tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = style_names(state, style)
    names = sorted(state)
    if shards == 1:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: state[n] for n in part}, folder / file, metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    tok_config = tokenizer_config or {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
                                      "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}
    if template is not None and tokenizer_config is None:
        tok_config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    size = model.config.vision_config.image_size
    pre = preprocessor if preprocessor is not None else {
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": size},
        "crop_size": {"height": size, "width": size}, "do_center_crop": True, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return folder
