"""Prompts are the checkpoint's own: templates in the styles hub checkpoints use render real image parts,
and the prompt our runtime evaluates is transformers' — the same positions, and next-token
log-probabilities within the documented F16 bound, with transformers' own LlavaProcessor (the
checkpoint's chat template, tokenizer and image processor) as the reference. Rope thetas are not the
default and the prompts long (past position 512), where a wrong theta shows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from builders import (LLAMA_TOKENIZER_CONFIG, LLAVA_HF_TEMPLATE, SPECIALS, build_model, build_tokenizer, save_checkpoint,
                      tiny_config, tiny_llama_config)
from gguf import GGUFReader
from PIL import Image
from spm_vocab import llama_tokenizer_json
from test_parity import IMAGE_BOUND, TEXT_BOUND, needs_patched_build, top10_gap
from tokenizers import Tokenizer
from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

from acestep_gguf import VisionChat, convert

QUESTION = "What is in this picture?"
LONG = " ".join(["The quick brown fox jumps over the lazy dog 0123456789 times!"] * 40) + " " + QUESTION
# Qwen2-VL's way: the picture between vision markers, the processor expanding <|image_pad|>.
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# llava-hf's llava-interleave / onevision style: all images of a message first, each followed by a newline.
IMAGES_FIRST_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN2_VL_SPECIALS = SPECIALS + ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]


def sharpened(model):
    """Random q/k projections give near-uniform attention, which hides positions; 8x sharper attention
    makes the rope theta matter (a wrong one then moves the log-probabilities ~0.03, not ~0.001)."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


def qwen2_case(tmp_path_factory, template: str, image_token: str):
    tok = build_tokenizer(specials=QWEN2_VL_SPECIALS)
    model = sharpened(build_model(tiny_config(tok, rope_theta=1_000_000.0, image_token=image_token)))
    folder = tmp_path_factory.mktemp("qwen2-template")
    ckpt = save_checkpoint(model, tok, folder / "ckpt", template=template, shards=2)
    return model, ckpt, image_token


def llama_case(tmp_path_factory, text: str):
    spm = Tokenizer.from_str(json.dumps(llama_tokenizer_json()))
    model = sharpened(build_model(tiny_llama_config(spm, text, rope_theta=500_000.0)))
    folder = tmp_path_factory.mktemp(text)
    ckpt = save_checkpoint(model, spm, folder / "ckpt", style="hub4", tokenizer_config=LLAMA_TOKENIZER_CONFIG)
    return model, ckpt, "<image>"


CASES = {
    "qwen2, Qwen2-VL placeholders": lambda f: qwen2_case(f, QWEN2_VL_TEMPLATE, "<|image_pad|>"),
    "qwen2, images first": lambda f: qwen2_case(f, IMAGES_FIRST_TEMPLATE, "<image>"),
    "llama, llava-hf's own template": lambda f: llama_case(f, "llama"),
    "mistral, llava-hf's own template": lambda f: llama_case(f, "mistral"),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    model, ckpt, image_token = CASES[request.param](tmp_path_factory)
    out = tmp_path_factory.mktemp("gguf") / "gguf"
    convert(ckpt, out=out, quant="F16", name="m")
    processor = LlavaProcessor(image_processor=CLIPImageProcessor.from_pretrained(ckpt),
                               tokenizer=AutoTokenizer.from_pretrained(ckpt), patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"],
                               image_token=image_token)
    with VisionChat.load(out, quant="F16", n_ctx=2048, n_gpu_layers=0) as chat:
        yield model, processor, chat, out


def transformers_logprobs(model, processor, text: str, image=None) -> tuple[np.ndarray, int]:
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    batch = processor(text=prompt, images=[image] if image is not None else None, return_tensors="pt")
    with torch.no_grad():
        kwargs = {"pixel_values": batch["pixel_values"]} if image is not None else {}
        logits = model(input_ids=batch["input_ids"], **kwargs).logits[0, -1].double()
    return torch.log_softmax(logits, -1).numpy(), batch["input_ids"].shape[1]


def test_the_checkpoints_own_template_is_kept(case):
    _, processor, chat, out = case
    assert chat.chat_template == processor.chat_template and chat.image_style.parts
    stored = GGUFReader(out / "m-F16.gguf").fields["acestep_gguf.chat_template.image_placeholder"].contents()
    assert stored == processor.image_token == chat.image_style.placeholder


@needs_patched_build
@pytest.mark.parametrize("text", [QUESTION, LONG])
def test_prompt_and_logprobs_are_transformers(case, noise_image, text):
    model, processor, chat, _ = case
    image = Image.open(noise_image).convert("RGB")
    for picture, bound in ((image, IMAGE_BOUND), (None, TEXT_BOUND)):
        chat.reset()
        reference, n_positions = transformers_logprobs(model, processor, text, picture)
        got = chat.next_token_logprobs(text, images=[picture] if picture is not None else [])
        assert chat.last_turn.prompt_positions == n_positions  # same prompt, position for position
        assert n_positions > 512 or text == QUESTION
        assert got[:len(reference)].argmax() == reference.argmax()
        assert top10_gap(reference, got) < bound


def test_a_wrong_theta_would_be_caught(case):
    """The long prompt sees the theta: the same model with the default theta (the defect) is outside
    the bound and several times further from transformers than our file."""
    model, processor, chat, _ = case
    rope = model.config.text_config.rope_parameters
    reference, _ = transformers_logprobs(model, processor, LONG)
    chat.reset()
    ours = top10_gap(reference, chat.next_token_logprobs(LONG))
    saved = rope["rope_theta"]
    try:
        rope["rope_theta"] = 10_000.0
        model.model.language_model.rotary_emb.__init__(model.config.text_config)
        wrong, _ = transformers_logprobs(model, processor, LONG)
    finally:
        rope["rope_theta"] = saved
        model.model.language_model.rotary_emb.__init__(model.config.text_config)
    assert top10_gap(reference, wrong) > max(TEXT_BOUND, 5 * ours)
