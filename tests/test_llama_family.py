"""LLaVA-1.5 (Llama) and BakLLaVA (Mistral) checkpoints convert and chat like ACE-Step 1.5: tiny
transformers models with Llama's real 32000-piece SentencePiece vocabulary, saved in the hub's
transformers-4 names as two shards; tokenization equal to Hugging Face's, next-token log-probabilities
equal to transformers' within the Qwen2 family's bounds."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from builders import LLAMA_TOKENIZER_CONFIG, build_model, save_checkpoint, tiny_llama_config
from gguf import GGUFReader
from hostile import cli_process
from PIL import Image
from spm_vocab import LLAMA_SPM, llama_tokenizer_json, reference_vectors
from test_parity import IMAGE_BOUND, Q8_0_BOUND, TEXT_BOUND, pixel_values, top10_gap
from tokenizers import Tokenizer

from acestep_gguf import VisionChat, convert
from acestep_gguf.convert.gguf_stream import unpermute_rope

QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def spm():
    return Tokenizer.from_str(json.dumps(llama_tokenizer_json()))


@pytest.fixture(scope="module", params=["llama", "mistral"])
def family_case(request, tmp_path_factory, spm):
    """(text model type, transformers model, converted folder with F16 + Q8_0 + mmproj F16)."""
    model = build_model(tiny_llama_config(spm, request.param))
    folder = tmp_path_factory.mktemp(request.param)
    ckpt = save_checkpoint(model, spm, folder / f"tiny-{request.param}", style="hub4", shards=2,
                           tokenizer_config=LLAMA_TOKENIZER_CONFIG)
    convert(ckpt, out=folder / "gguf", quant="F16,Q8_0", name="tiny")
    return request.param, model, folder / "gguf", ckpt


def test_the_rebuilt_vocabulary_is_llamas(spm):
    """The test fixture itself: Hugging Face tokenizers on the rebuilt tokenizer.json reproduce the
    reference tokenizations llama.cpp ships (made with the real SentencePiece tokenizer)."""
    for text, ids in reference_vectors(LLAMA_SPM):
        assert spm.encode(text, add_special_tokens=False).ids == ids, repr(text)


def mixed_strings(n: int = 300) -> list[str]:
    rng = np.random.default_rng(11)
    words = ["Hello", "world", "the", "circle", "café", "naïve", "Straße", "東京", "😀", "über", "ÄÖÜ", "12", "3.14159",
             "1,000,000", "can't", "e-mail", "C++", "x=y+1", "<tag>", "\t", "\n", "  ", "   ", "!", "?", "...", "ŝ",
             "Привет", "مرحبا", "नमस्ते", "👍🏽", "0x1F", "__init__", "http://x.y/z", "A", "a", "I'm", "’"]
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 9))
        out.append("".join(rng.choice(words) + (" " if rng.random() < 0.6 else "") for _ in range(k)))
    return out


def test_llama_cpp_tokenizes_like_hugging_face(family_case, spm):
    from llama_cpp import Llama
    _, _, folder, _ = family_case
    llm = Llama(str(folder / "tiny-F16.gguf"), vocab_only=True, verbose=False)
    try:
        cases = [(text, None) for text in mixed_strings()] + reference_vectors(LLAMA_SPM)
        for text, reference in cases:
            expected = spm.encode(text, add_special_tokens=False).ids
            assert reference is None or expected == reference
            assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == expected, repr(text)
        # special tokens: <s> first, and </s> inside a text, parsed as the control tokens
        assert llm.tokenize(b"Hi</s>", add_bos=True, special=True)[0] == 1
        assert llm.tokenize(b"Hi</s>", add_bos=False, special=True)[-1] == 2
    finally:
        llm.close()


def test_metadata_is_what_llama_cpp_expects_for_llama(family_case):
    _, model, folder, _ = family_case
    reader = GGUFReader(folder / "tiny-F16.gguf")
    f = {k: v.contents() for k, v in reader.fields.items() if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                                                       "tokenizer.ggml.token_type") and not k.startswith("GGUF")}
    assert (f["general.architecture"], f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("llama", "llama", "default")
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_space_prefix"] is True
    assert f["general.type"] == "model" and "ASSISTANT:" in f["tokenizer.chat_template"]  # the built-in LLaVA-1.5 one
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[3] == 6 and types[1] == 3 and types[0] == 2 and types[32000] == 3  # <0x00> BYTE, <s> CONTROL, <unk>, <image>
    assert "blk.0.attn_q.bias" not in {t.name for t in reader.tensors}
    # q and k are stored in llama.cpp's rotary order: un-permuted from Hugging Face's
    t = next(t for t in reader.tensors if t.name == "blk.1.attn_k.weight")
    source = model.model.language_model.layers[1].self_attn.k_proj.weight.detach().numpy()
    expected = unpermute_rope(source.reshape(-1), model.config.text_config.num_key_value_heads, source.shape)
    np.testing.assert_allclose(t.data.astype(np.float32).reshape(-1), expected, atol=1e-3)
    assert not np.allclose(t.data.astype(np.float32).reshape(-1), source.reshape(-1), atol=1e-3)


def hf_logprobs(model, spm, image=None) -> np.ndarray:
    """LLaVA-1.5's prompt as transformers sees it: <s>USER: <image>\\nQUESTION ASSISTANT:"""
    image_id = spm.token_to_id("<image>")
    if image is None:
        ids = [1] + spm.encode(f"USER: {QUESTION} ASSISTANT:", add_special_tokens=False).ids
    else:
        ids = [1] + spm.encode("USER: ", add_special_tokens=False).ids + [image_id] * 16 + \
            spm.encode(f"\n{QUESTION} ASSISTANT:", add_special_tokens=False).ids
    with torch.no_grad():
        kwargs = {"pixel_values": pixel_values(image)} if image is not None else {}
        logits = model(input_ids=torch.tensor([ids]), **kwargs).logits[0, -1].double()
    return torch.log_softmax(logits, -1).numpy()


@pytest.mark.parametrize("quant", ["F16", "Q8_0"])
def test_next_token_logprobs_match_transformers(family_case, spm, noise_image, quant):
    _, model, folder, _ = family_case
    image = Image.open(noise_image)
    with VisionChat.load(folder, quant=quant, n_ctx=512, n_gpu_layers=0) as chat:
        for picture, bound in ((None, TEXT_BOUND), (image, IMAGE_BOUND)):
            chat.reset()
            reference = hf_logprobs(model, spm, picture)
            got = chat.next_token_logprobs(QUESTION, images=[picture] if picture is not None else [])
            assert chat.last_turn.prompt_positions == (34 if picture is not None else 15)
            assert got.argmax() == reference.argmax()
            assert top10_gap(reference, got) < (bound if quant == "F16" else Q8_0_BOUND)


def test_greedy_chat_is_stable_across_runs(family_case, noise_image):
    _, _, folder, _ = family_case
    runs = [cli_process("chat", noise_image, "-m", folder, "-p", QUESTION, "--max-tokens", "12", "--quant", "Q8_0")
            for _ in range(2)]
    assert runs[0].returncode == 0 and runs[0].stdout.strip() != "" and runs[0].stdout == runs[1].stdout
    follow = cli_process("chat", noise_image, "-m", folder, "--max-tokens", "6", input="Describe it.\nAnd again?\n/quit\n")
    assert follow.returncode == 0 and len([ln for ln in follow.stdout.splitlines() if ln.strip()]) == 2


def test_manifest_names_the_family(family_case):
    _, _, folder, _ = family_case
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"]["family"] == "llava_llama"
    assert [f["file"] for f in manifest["source"]["files"]] == ["model-00001-of-00002.safetensors",
                                                                "model-00002-of-00002.safetensors"]


# config.json of llava-hf/llava-1.5-7b-hf as published (transformers 4 wrote only what differs from
# the defaults: no hidden_size, no layer count in text_config).
LLAVA_1_5_7B_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                      "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}


def test_the_published_llava_1_5_config_reads_as_transformers_reads_it():
    from acestep_gguf.models.registry import detect
    family = detect(LLAVA_1_5_7B_CONFIG)
    hp = family.hparams(LLAVA_1_5_7B_CONFIG, {"crop_size": {"height": 336, "width": 336}, "size": {"shortest_edge": 336}})
    h, v = hp.text, hp.vision
    assert family.name == "llava_llama"
    assert (h.n_embd, h.n_ff, h.n_layer, h.n_head, h.n_head_kv, h.n_vocab) == (4096, 11008, 32, 32, 32, 32064)
    assert (h.max_pos, h.rms_eps, h.rope_theta, h.tie_word_embeddings) == (4096, 1e-5, 10000.0, False)
    assert (v.v_embd, v.v_ff, v.v_feature_layer, v.v_image, v.v_act) == (1024, 4096, 23, 336, "quick_gelu")
    bakllava = {**LLAVA_1_5_7B_CONFIG, "text_config": {"model_type": "mistral", "vocab_size": 32002}}
    h = detect(bakllava).hparams(bakllava, {}).text
    assert (h.n_ff, h.n_head_kv, h.max_pos) == (14336, 8, 131072)  # MistralConfig's defaults
    # the same shapes as the planner's card for it
    from acestep_gguf.models.presets import PRESETS
    card = PRESETS["llava-1.5-7b"]
    assert card.text == replace(hp.text, max_pos=0, rms_eps=1e-6) and card.vision.v_feature_layer == v.v_feature_layer
    assert (card.vision.v_embd, card.vision.v_ff, card.vision.n_embd) == (1024, 4096, 4096)
