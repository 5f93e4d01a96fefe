"""Pixtral converts and chats as transformers runs it: a tiny real LlavaForConditionalGeneration with a
Pixtral vision tower (2D rope, RMSNorm, gated SiLU FFN, 16 px patches, no [CLS]) and a Mistral language
model with a byte-level BPE vocabulary split the Llama-3 way (as mistral-community/pixtral-12b's
tokenizer.json is), saved in the hub's names as two shards with the hub's chat template (BOS written by
the template, replies as strings). The reference is transformers' PixtralProcessor + model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from builders import CORPUS, build_model, save_checkpoint
from gguf import GGUFReader
from hostile import cli_process
from PIL import Image
from test_convert_errors import assert_clean_failure, cli
from test_llama_family import mixed_strings
from test_parity import IMAGE_BOUND, Q8_0_BOUND, TEXT_BOUND, needs_patched_build, top10_gap
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (LlavaConfig, MistralConfig, PixtralImageProcessor, PixtralVisionConfig,
                          PreTrainedTokenizerFast)

from acestep_gguf import VisionChat, convert
from acestep_gguf.convert.tokenizer import LLAMA3_SPLIT

try:
    import torchvision  # noqa: F401
except ImportError:  # PixtralProcessor uses no torchvision, but imports one helper through the torchvision
    import sys  # image processor; the PIL image processor's module defines the same function
    from transformers.models.pixtral import image_processing_pil_pixtral
    sys.modules.setdefault("transformers.models.pixtral.image_processing_pixtral", image_processing_pil_pixtral)
from transformers.models.pixtral.processing_pixtral import PixtralProcessor  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
# mistral-community/pixtral-12b's chat template (chat_template.json), as published
PIXTRAL_HUB_TEMPLATE = (
    '{%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}{%- set loop_messages = '
    'messages[1:] %}\n{%- else %}{%- set loop_messages = messages %}{%- endif %}{{- bos_token }}{%- for message in '
    "loop_messages %}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{- raise_exception('After the "
    "optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    '{%- if message["role"] == "user" %}{%- if loop.last and system_message is defined %}{{- "[INST]" + system_message '
    '+ "\n\n" }}{%- else %}{{ "[INST]" }}{%- endif %}{%- endif %}{%- if message["content"] is not string %}{%- for '
    'chunk in message["content"] %}{%- if chunk["type"] == "text" %}{%- if "content" in chunk %}{{- chunk["content"] }}'
    '{%- elif "text" in chunk %}{{- chunk["text"] }}{%- endif %}{%- elif chunk["type"] == "image" %}{{- "[IMG]" }}'
    '{%- else %}{{- raise_exception("Unrecognized content type!") }}{%- endif %}{%- endfor %}{%- else %}{{- '
    'message["content"] }}{%- endif %}{%- if message["role"] == "user" %}{{- "[/INST]" }}{%- elif message["role"] == '
    '"assistant" %}{{- eos_token}}{%- else %}{{- raise_exception("Only user and assistant roles are supported, with '
    'the exception of an initial optional system message!") }}{%- endif %}{%- endfor %}'
)
LONGEST, PATCH = 64, 16
PREPROCESSOR = {"image_processor_type": "PixtralImageProcessor", "size": {"longest_edge": LONGEST},
                "patch_size": {"height": PATCH, "width": PATCH}, "resample": 3, "do_resize": True, "do_rescale": True,
                "do_normalize": True, "do_convert_rgb": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
QUESTION = "What is in this picture?"
# wide and its transpose, tall, smaller than one patch row, larger than the longest edge, odd sizes
SHAPES = {"wide": (150, 60), "tall": (60, 150), "tiny": (20, 12), "large": (300, 250), "odd": (47, 33)}


def picture(name: str) -> Image.Image:
    w, h = SHAPES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    x = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    x[: max(1, h // 3)] = (30, 160, 220)
    return Image.fromarray(x)


def build_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS + ["1234567 89 1000000 3.14159 x=12345"] * 10, trainer)
    return tok


@pytest.fixture(scope="module")
def bpe():
    return build_bpe()


def tiny_pixtral_config(tok: Tokenizer) -> LlavaConfig:
    text = MistralConfig(vocab_size=416, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e9})
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                 head_dim=16, image_size=LONGEST, patch_size=PATCH, hidden_act="silu")
    return LlavaConfig(text_config=text, vision_config=vision, image_token_index=tok.token_to_id("[IMG]"),
                       vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu")


TOKENIZER_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
                    "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": PIXTRAL_HUB_TEMPLATE}


@pytest.fixture(scope="module")
def case(tmp_path_factory, bpe):
    model = build_model(tiny_pixtral_config(bpe))
    folder = tmp_path_factory.mktemp("pixtral")
    ckpt = save_checkpoint(model, bpe, folder / "tiny-pixtral", style="saved5", shards=2,
                           tokenizer_config=TOKENIZER_CONFIG, preprocessor=PREPROCESSOR)
    convert(ckpt, out=folder / "gguf", quant="F16,Q8_0", name="tiny")
    return model, ckpt, folder / "gguf"


@pytest.fixture(scope="module")
def processor(case):
    _, ckpt, _ = case
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    return PixtralProcessor(image_processor=PixtralImageProcessor(**PREPROCESSOR), tokenizer=tokenizer, patch_size=PATCH,
                            spatial_merge_size=1, chat_template=PIXTRAL_HUB_TEMPLATE, image_token="[IMG]",
                            image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")


def reference(model, processor, image=None):
    """(log-probabilities of the first reply token, prompt length): the checkpoint's template and
    processor through apply_chat_template, as transformers' docs run Pixtral."""
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": QUESTION}]
    inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    assert inputs["input_ids"][0, :2].tolist().count(1) == 1  # one BOS
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].double()
    return torch.log_softmax(logits, -1).numpy(), inputs["input_ids"].shape[1]


@pytest.fixture(scope="module")
def chat(case):
    _, _, gguf = case
    with VisionChat.load(gguf, quant="F16", n_ctx=1024, n_gpu_layers=0) as session:
        yield session


def test_metadata_and_the_img_break_row(case, bpe):
    model, _, gguf = case
    reader = GGUFReader(gguf / "mmproj-tiny-F16.gguf")
    fields = {k: v.contents() for k, v in reader.fields.items()}
    assert fields["clip.projector_type"] == "pixtral" and fields["clip.use_silu"] is True
    assert fields["clip.vision.block_count"] == 3 and fields["clip.vision.image_size"] == LONGEST
    row = next(t for t in reader.tensors if t.name == "v.token_embd.img_break").data
    expected = model.model.language_model.embed_tokens.weight[bpe.token_to_id("[IMG_BREAK]")].detach().numpy()
    np.testing.assert_array_equal(row, expected)
    lm = GGUFReader(gguf / "tiny-F16.gguf")
    assert lm.fields["tokenizer.ggml.pre"].contents() == "pixtral"
    assert json.loads((gguf / "manifest.json").read_text())["source"]["family"] == "llava_pixtral"
    info = cli("info", gguf / "mmproj-tiny-F16.gguf")
    assert "vision_tower: pixtral" in info.stdout and "image_tokens_max: 20" in info.stdout


def test_llama_cpp_tokenizes_like_the_checkpoint(case, bpe):
    from llama_cpp import Llama
    _, _, gguf = case
    llm = Llama(str(gguf / "tiny-F16.gguf"), vocab_only=True, verbose=False)
    try:
        for text in mixed_strings(300) + ["12345678 x 1000000", "  a\n\n b\t c"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == bpe.encode(text).ids, repr(text)
        # control tokens in the template's markup are parsed as such
        assert llm.tokenize(b"[INST]hi[/INST]", add_bos=False, special=True) == bpe.encode("[INST]hi[/INST]").ids
    finally:
        llm.close()


@pytest.mark.parametrize("name", list(SHAPES))
def test_pictures_are_sized_as_pixtral_image_processor_sizes_them(name):
    from acestep_gguf.runtime.images import PixelRecipe, prepare
    image = picture(name)
    ours = prepare(image, PixelRecipe(LONGEST, PATCH, LONGEST, 3, (), LONGEST))
    expected = PixtralImageProcessor(**PREPROCESSOR)(images=[image], return_tensors="np")
    h, w = (int(v) for v in expected["image_sizes"][0])
    assert ours.shape == (w, h)
    mean, std = np.array(PREPROCESSOR["image_mean"]), np.array(PREPROCESSOR["image_std"])
    x = (np.frombuffer(ours.rgb, np.uint8).reshape(h, w, 3) / 255.0 - mean) / std
    np.testing.assert_allclose(x.transpose(2, 0, 1), expected["pixel_values"][0][:, :h, :w], atol=1e-5)


@needs_patched_build
@pytest.mark.parametrize("name", list(SHAPES))
def test_positions_and_logprobs_match_transformers(case, processor, chat, name):
    model, _, _ = case
    expected, n_prompt = reference(model, processor, picture(name))
    chat.reset()
    got = chat.next_token_logprobs(QUESTION, images=[picture(name)])
    assert chat.last_turn.prompt_positions == n_prompt
    assert got.argmax() == expected.argmax()
    assert top10_gap(expected, got) < IMAGE_BOUND
    other, _ = reference(model, processor, picture("tall" if name != "tall" else "wide"))
    assert top10_gap(expected, other) > 5 * top10_gap(expected, got)


def test_text_only_matches_transformers(case, processor, chat):
    model, _, _ = case
    expected, n_prompt = reference(model, processor)
    chat.reset()
    got = chat.next_token_logprobs(QUESTION)
    assert chat.last_turn.prompt_positions == n_prompt
    assert got.argmax() == expected.argmax() and top10_gap(expected, got) < TEXT_BOUND


@needs_patched_build
def test_q8_0_matches_transformers(case, processor):
    model, _, gguf = case
    with VisionChat.load(gguf, quant="Q8_0", n_ctx=1024, n_gpu_layers=0) as q8:
        expected, _ = reference(model, processor, picture("wide"))
        got = q8.next_token_logprobs(QUESTION, images=[picture("wide")])
        assert got.argmax() == expected.argmax() and top10_gap(expected, got) < Q8_0_BOUND


def test_changing_shapes_in_one_session_and_follow_ups(chat):
    """Transposed pictures of the same patch count one after another (mtmd once gave NaN for the
    second without warm-up), then a follow-up that reuses the cache."""
    runs = {}
    for name in ("wide", "tall", "wide", "tiny", "tall"):
        chat.reset()
        got = chat.next_token_logprobs(QUESTION, images=[picture(name)])
        assert np.isfinite(got).all()
        runs.setdefault(name, []).append(got)
    for first, *rest in runs.values():
        for again in rest:
            np.testing.assert_allclose(first, again, atol=1e-5)
    chat.reset()
    chat.ask(QUESTION, images=[picture("large")], max_tokens=3)
    n = chat.last_turn.prompt_positions
    chat.ask("And the colour?", max_tokens=3)
    assert chat.last_turn.images_encoded == 0 and chat.last_turn.reused_positions >= n


def test_chat_cli(case, tmp_path):
    _, _, gguf = case
    shot = tmp_path / "screenshot.png"
    picture("large").save(shot)
    done = cli_process("chat", shot, "-m", gguf, "-p", QUESTION, "--max-tokens", "5", "--quant", "Q8_0")
    assert done.returncode == 0 and done.stdout.strip() != "", done.stderr


def test_plan_preset():
    result = cli("plan", "--preset", "pixtral-12b", "--vram", "12GiB", "--ctx", "8192")
    assert result.exit_code == 0, result.stderr
    assert "one picture takes up to 4160 of the 8192 context positions" in result.stdout


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture()
def fresh(case, tmp_path):
    import shutil
    copy = tmp_path / "ckpt"
    shutil.copytree(case[1], copy)
    return copy


@pytest.mark.parametrize("file,change,needle", [
    ("config.json", lambda c: c.update(vision_feature_select_strategy="default"), "must be 'full' for a Pixtral tower"),
    ("config.json", lambda c: c["vision_config"].update(rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
     "rope theta 1e+06"),
    ("config.json", lambda c: c["vision_config"].update(hidden_act="relu"), "hidden_act 'relu'"),
    ("config.json", lambda c: c["vision_config"].update(head_dim=8), "head_dim differs"),
    ("config.json", lambda c: c["vision_config"].update(patch_size=10 ** 8), "patch_size is 100000000, outside"),
    ("config.json", lambda c: c["vision_config"].update(num_attention_heads=3), "multiple of 4"),
    ("preprocessor_config.json", lambda p: p.update(size={"longest_edge": 4096}), "longest_edge 4096 is outside"),
    ("preprocessor_config.json", lambda p: p.update(patch_size={"height": 14, "width": 14}), "patch_size 14x14"),
    ("preprocessor_config.json", lambda p: p.update(patch_size="big"), "patch_size is 'big'"),
    ("tokenizer.json", lambda t: t.update(added_tokens=[a for a in t["added_tokens"] if a["content"] != "[IMG_BREAK]"])
     or t["model"]["vocab"].pop("[IMG_BREAK]"), "no [IMG_BREAK] token"),
])
def test_hostile_pixtral_configs(tmp_path, fresh, file, change, needle):
    edit_json(fresh / file, change)
    assert_clean_failure(cli("convert", fresh, "--out", tmp_path / "o"), needle, out=tmp_path / "o")


def test_a_restarted_server_restores_a_native_size_picture(case, tmp_path):
    from test_llava_next import served_from_disk_after_a_restart
    shot = tmp_path / "large.png"
    picture("large").save(shot)
    served_from_disk_after_a_restart(case[2], shot, tmp_path)


@needs_patched_build
def test_a_picture_over_mtmds_own_1024_patch_cap_is_not_resized(tmp_path, bpe):
    """mtmd caps Pixtral pictures at 1024 patches by default and resizes by its own rule; a real 1024 px
    picture has up to 4096. A tower with a 640 px longest edge and a 600x600 picture (38x38 = 1444
    patches) shows the runtime lifts the cap: the same positions and answer as transformers."""
    config = tiny_pixtral_config(bpe)
    config.vision_config.image_size = 640
    model = build_model(config)
    pre = {**PREPROCESSOR, "size": {"longest_edge": 640}}
    ckpt = save_checkpoint(model, bpe, tmp_path / "big", style="saved5", tokenizer_config=TOKENIZER_CONFIG, preprocessor=pre)
    convert(ckpt, out=tmp_path / "gguf", quant="F16", name="big")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    processor = PixtralProcessor(image_processor=PixtralImageProcessor(**pre), tokenizer=tokenizer, patch_size=PATCH,
                                 spatial_merge_size=1, chat_template=PIXTRAL_HUB_TEMPLATE, image_token="[IMG]",
                                 image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (600, 600, 3), dtype=np.uint8))
    expected, n_prompt = reference(model, processor, image)
    with VisionChat.load(tmp_path / "gguf", n_ctx=2048, n_gpu_layers=0) as chat:
        got = chat.next_token_logprobs(QUESTION, images=[image])
        assert chat.last_turn.prompt_positions == n_prompt > 38 * 38
    assert got.argmax() == expected.argmax() and top10_gap(expected, got) < IMAGE_BOUND
