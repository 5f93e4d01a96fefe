"""LLaVA-NeXT (LLaVA-1.6) converts and chats as transformers runs it: a tiny real
LlavaNextForConditionalGeneration (Mistral with Llama's real SentencePiece vocabulary, CLIP at 56 px
tiles, pinpoints up to 3 tiles), saved in the hub's transformers-4 names as two shards with the
hub's own llava-v1.6-mistral chat template. The reference is transformers' own LlavaNextProcessor
(the checkpoint's template, its image processor's tiles, its placeholder expansion) and model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from builders import LLAMA_TOKENIZER_CONFIG, build_model, save_checkpoint
from gguf import GGUFReader
from gguf import GGUFValueType as T
from hostile import cli_process, one_error_line
from PIL import Image
from spm_vocab import llama_tokenizer_json
from test_convert_errors import assert_clean_failure, cli
from test_parity import IMAGE_BOUND, Q8_0_BOUND, TEXT_BOUND, top10_gap, needs_patched_build
from tokenizers import Tokenizer
from transformers import (CLIPVisionConfig, LlamaTokenizerFast, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextImageProcessor, LlavaNextProcessor, MistralConfig)

from acestep_gguf import VisionChat, convert
from acestep_gguf.models import llava_next
from acestep_gguf.runtime.images import PixelRecipe, prepare

# llava-hf/llava-v1.6-mistral-7b-hf's chat template (chat_template.json), as published
MISTRAL_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] + "
    "'\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next "
    "#}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
TILE, PATCH = 56, 14
PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
PREPROCESSOR = {"image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": TILE},
                "crop_size": {"height": TILE, "width": TILE}, "image_grid_pinpoints": PINPOINTS, "do_pad": True,
                "do_center_crop": True, "resample": 3, "image_mean": MEAN, "image_std": STD, "do_convert_rgb": True}
QUESTION = "What is in this picture?"
# wide, tall, smaller than one tile, larger than the largest pinpoint, square, one pinpoint's own shape
SHAPES = {"wide": (150, 60), "tall": (50, 140), "small": (40, 30), "large": (300, 250), "square": (90, 90),
          "exact": (112, 56)}


def picture(name: str) -> Image.Image:
    w, h = SHAPES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    x = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    x[: h // 3] = (200, 30, 40)  # structure, so that tile order and unpadding matter
    return Image.fromarray(x)


@pytest.fixture(scope="module")
def spm():
    return Tokenizer.from_str(json.dumps(llama_tokenizer_json()))


def tiny_next_config(spm) -> LlavaNextConfig:
    text = MistralConfig(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=spm.token_to_id("<pad>"),
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=TILE, patch_size=PATCH, hidden_act="quick_gelu")
    return LlavaNextConfig(text_config=text, vision_config=vision, image_token_index=spm.token_to_id("<image>"),
                           image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", projector_hidden_act="gelu")


@pytest.fixture(scope="module")
def case(tmp_path_factory, spm):
    """(transformers model, checkpoint folder, converted folder with F16 + Q8_0 + mmproj F16)."""
    model = build_model(tiny_next_config(spm), cls=LlavaNextForConditionalGeneration)
    folder = tmp_path_factory.mktemp("next")
    ckpt = save_checkpoint(model, spm, folder / "tiny-next", style="hub4", shards=2,
                           tokenizer_config={**LLAMA_TOKENIZER_CONFIG, "chat_template": MISTRAL_NEXT_TEMPLATE},
                           preprocessor=PREPROCESSOR)
    convert(ckpt, out=folder / "gguf", quant="F16,Q8_0", name="tiny")
    return model, ckpt, folder / "gguf"


@pytest.fixture(scope="module")
def processor(case):
    _, ckpt, _ = case
    tokenizer = LlamaTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", add_bos_token=True, legacy=True)
    return LlavaNextProcessor(image_processor=LlavaNextImageProcessor(**PREPROCESSOR), tokenizer=tokenizer,
                              patch_size=PATCH, vision_feature_select_strategy="default", image_token="<image>",
                              num_additional_image_tokens=1, chat_template=MISTRAL_NEXT_TEMPLATE)


def reference(model, processor, image=None):
    """(log-probabilities of the first reply token, prompt length) as transformers computes them with
    the checkpoint's own template and processor."""
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[image] if image is not None else None, text=text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].double()
    return torch.log_softmax(logits, -1).numpy(), inputs["input_ids"].shape[1]


@pytest.fixture(scope="module")
def chat(case):
    _, _, gguf = case
    with VisionChat.load(gguf, quant="F16", n_ctx=2048, n_gpu_layers=0) as session:
        yield session


def test_the_mmproj_is_llava_1_5s_plus_the_tiling(case):
    _, _, gguf = case
    reader = GGUFReader(gguf / "mmproj-tiny-F16.gguf")
    fields = {k: v.contents() for k, v in reader.fields.items()}
    assert fields["clip.projector_type"] == "mlp"
    # (width, height) pairs, the order clip.cpp reads them in
    assert fields["clip.vision.image_grid_pinpoints"] == [112, 56, 56, 112, 112, 112, 56, 168, 168, 56]
    assert fields["clip.vision.mm_patch_merge_type"] == "spatial_unpad"
    newline = next(t for t in reader.tensors if t.name == "v.image_newline")
    model = case[0]
    np.testing.assert_allclose(newline.data.astype(np.float32), model.model.image_newline.detach().numpy(), atol=1e-3)
    manifest = json.loads((gguf / "manifest.json").read_text())
    assert manifest["source"]["family"] == "llava_next_llama"
    info = cli("info", gguf / "mmproj-tiny-F16.gguf")
    assert "vision_tower: clip-anyres" in info.stdout and "image_tokens_max: 88" in info.stdout


@pytest.mark.parametrize("name", list(SHAPES))
def test_tiles_match_llava_next_image_processor(name):
    """Our tiles, normalised as llama.cpp normalises them, equal the processor's pixel_values: the
    overview first, then the best pinpoint's tiles row by row."""
    recipe = PixelRecipe(TILE, PATCH, TILE, 3, tuple(map(tuple, PINPOINTS)))
    image = picture(name)
    ours = prepare(image, recipe)
    expected = LlavaNextImageProcessor(**PREPROCESSOR)(images=[image], return_tensors="np")
    values = expected["pixel_values"][0]
    tiles = [ours.rgb, *ours.tiles]
    assert len(tiles) == ours.layout.rows * ours.layout.cols + 1
    for i, rgb in enumerate(tiles):
        x = (np.frombuffer(rgb, np.uint8).reshape(TILE, TILE, 3) / 255.0 - MEAN) / STD
        np.testing.assert_allclose(x.transpose(2, 0, 1), values[i], atol=1e-5, err_msg=f"tile {i}")
    assert list(expected["image_sizes"][0]) == [image.height, image.width]


@needs_patched_build
@pytest.mark.parametrize("name", list(SHAPES))
def test_image_positions_and_logprobs_match_transformers(case, processor, chat, name):
    model, _, _ = case
    image = picture(name)
    expected, n_prompt = reference(model, processor, image)
    chat.reset()
    got = chat.next_token_logprobs(QUESTION, images=[image])
    assert chat.last_turn.prompt_positions == n_prompt  # the same number of image positions
    assert chat.last_turn.images_encoded == 1
    assert got.argmax() == expected.argmax()
    assert top10_gap(expected, got) < IMAGE_BOUND
    # the bound is meaningful: another picture moves the same distribution by far more
    other, _ = reference(model, processor, picture("tall" if name != "tall" else "wide"))
    assert top10_gap(expected, other) > 5 * top10_gap(expected, got)


def test_text_only_logprobs_match_transformers(case, processor, chat):
    model, _, _ = case
    expected, n_prompt = reference(model, processor)
    chat.reset()
    got = chat.next_token_logprobs(QUESTION)
    assert chat.last_turn.prompt_positions == n_prompt
    assert got.argmax() == expected.argmax() and top10_gap(expected, got) < TEXT_BOUND


@needs_patched_build
@pytest.mark.parametrize("name", ["wide", "tall"])
def test_packed_features_match_transformers(case, processor, chat, name):
    """encode_image = get_image_features + pack_image_features: overview first, the unpadded grid with
    image_newline after every row."""
    model, _, _ = case
    image = picture(name)
    inputs = processor(images=[image], text="<image>", return_tensors="pt")
    with torch.no_grad():  # transformers 5 packs inside get_image_features
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], vision_feature_layer=-2,
                                             vision_feature_select_strategy="default")
    packed = torch.cat(list(out.pooler_output)) if isinstance(out.pooler_output, (list, tuple)) else out.pooler_output
    got = chat.encode_image(image)
    assert got.shape == tuple(packed.shape)
    assert np.abs(got - packed.numpy()).max() / np.abs(packed.numpy()).max() < 1e-3


@needs_patched_build
def test_q8_0_matches_transformers(case, processor):
    model, _, gguf = case
    image = picture("wide")
    with VisionChat.load(gguf, quant="Q8_0", n_ctx=2048, n_gpu_layers=0) as q8:
        expected, _ = reference(model, processor, image)
        got = q8.next_token_logprobs(QUESTION, images=[image])
        assert got.argmax() == expected.argmax() and top10_gap(expected, got) < Q8_0_BOUND


def test_a_follow_up_reuses_the_picture(chat):
    chat.reset()
    chat.ask(QUESTION, images=[picture("large")], max_tokens=4)
    first = chat.last_turn
    assert first.images_encoded == 1
    chat.ask("And the colour?", max_tokens=4)
    assert chat.last_turn.images_encoded == 0
    assert chat.last_turn.reused_positions >= first.prompt_positions
    # the same picture in a new conversation of the same session: encoded again, same answer
    chat.reset()
    again = chat.next_token_logprobs(QUESTION, images=[picture("large")])
    assert chat.last_turn.images_encoded == 1 and np.isfinite(again).all()


def test_pictures_of_changing_shapes_in_one_session(chat):
    """mtmd is handed one square tile at a time, whatever the picture's shape: a session that sees
    wide, then tall, then wide pictures gives the same answers as fresh ones."""
    results = {}
    for name in ("wide", "tall", "wide", "small", "tall"):
        chat.reset()
        got = chat.next_token_logprobs(QUESTION, images=[picture(name)])
        assert np.isfinite(got).all()
        results.setdefault(name, []).append(got)
    for runs in results.values():
        np.testing.assert_allclose(runs[0], runs[-1], atol=1e-5)


def test_chat_cli_on_a_wide_screenshot(case, tmp_path):
    _, _, gguf = case
    shot = tmp_path / "wide-screenshot.png"
    picture("wide").resize((1600, 400)).save(shot)
    done = cli_process("chat", shot, "-m", gguf, "-p", QUESTION, "--max-tokens", "6", "--quant", "Q8_0", "--ctx", "4096")
    assert done.returncode == 0 and done.stdout.strip() != "", done.stderr


def test_the_context_check_counts_the_worst_tiling(case):
    _, _, gguf = case
    # overview 16 + the 168x56 pinpoint's 4x12 grid with a newline per row = 16 + 4 * 13 ... the largest is 112x112
    worst = llava_next.max_tokens(PINPOINTS, TILE, PATCH)
    assert worst == 16 + 8 * 9
    from acestep_gguf.errors import OptionError
    with pytest.raises(OptionError, match=f"one image takes up to {worst} positions"):
        VisionChat.load(gguf, quant="F16", n_ctx=worst, n_gpu_layers=0)
    with VisionChat.load(gguf, quant="F16", n_ctx=worst + 32, n_gpu_layers=0) as smallest:
        assert smallest.max_image_tokens == worst


def test_plan_presets_for_llava_1_6():
    from acestep_gguf.models.presets import PRESETS
    for name in ("llava-v1.6-mistral-7b", "llava-v1.6-vicuna-7b", "llava-v1.6-vicuna-13b", "llava-v1.6-34b"):
        result = cli("plan", "--preset", name, "--vram", "12GiB", "--ctx", "4096")
        assert result.exit_code == 0, result.stderr
        assert "one picture takes up to 2928 of the 4096 context positions" in result.stdout
    assert PRESETS["llava-v1.6-34b"].text.n_layer == 60
    small = cli("plan", "--preset", "llava-v1.6-mistral-7b", "--vram", "12GiB", "--ctx", "2048")
    assert "too small a --ctx for one picture" in small.stdout


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture()
def fresh_next(case, tmp_path):
    import shutil
    _, ckpt, _ = case
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    return copy


@pytest.mark.parametrize("file,change,needle", [
    ("config.json", lambda c: c.update(image_grid_pinpoints="anyres"), "image_grid_pinpoints must be a list"),
    ("config.json", lambda c: c.update(image_grid_pinpoints=[[56]]), "is not a [height, width] pair"),
    ("config.json", lambda c: c.update(image_grid_pinpoints=[[56, 70]]), "not a whole number of 56-pixel tiles"),
    ("config.json", lambda c: c.update(image_grid_pinpoints=[[56, 56]] * 100000), "a list of 1 to 64"),
    ("config.json", lambda c: c.update(image_grid_pinpoints=[[56, 10 ** 9]]), "is not a [height, width] pair"),
    ("config.json", lambda c: c.update(image_grid_pinpoints=[[56, "112"]]), "is not a [height, width] pair"),
    ("config.json", lambda c: c.update(image_grid_pinpoints=[[4088, 4088]]), "more than 64 tiles"),
    ("config.json", lambda c: c.update(image_grid_pinpoints=[]), "a list of 1 to 64"),
    ("config.json", lambda c: c["vision_config"].update(patch_size=10 ** 7), "patch_size is 10000000, outside"),
    ("config.json", lambda c: c["vision_config"].update(image_size=57), "image_size is not a multiple of patch_size"),
    ("preprocessor_config.json", lambda p: p.update(image_grid_pinpoints=[[56, 112]]), "differ from config.json's"),
    ("preprocessor_config.json", lambda p: p.update(size={"shortest_edge": 112}), "differs from the 56-pixel tile"),
])
def test_hostile_llava_next_configs(tmp_path, fresh_next, file, change, needle):
    edit_json(fresh_next / file, change)
    assert_clean_failure(cli("convert", fresh_next, "--out", tmp_path / "o"), needle, out=tmp_path / "o")


def test_a_missing_image_newline_is_named(tmp_path, fresh_next):
    from safetensors.numpy import load_file, save_file
    shard = next(p for p in sorted(fresh_next.glob("*.safetensors")) if "image_newline" in load_file(p))
    tensors = load_file(shard)
    del tensors["image_newline"]
    save_file(tensors, shard, metadata={"format": "pt"})
    index = fresh_next / "model.safetensors.index.json"
    edit_json(index, lambda i: i["weight_map"].pop("image_newline"))
    assert_clean_failure(cli("convert", fresh_next, "--out", tmp_path / "o"), "image_newline", "missing",
                         out=tmp_path / "o")


@pytest.mark.parametrize("edit,needle", [
    ({"fields": {"clip.vision.image_grid_pinpoints": ([112, 56, 70], T.ARRAY, T.INT32)}}, "image_grid_pinpoints must be"),
    ({"fields": {"clip.vision.image_grid_pinpoints": ([112, -56], T.ARRAY, T.INT32)}}, "image_grid_pinpoints must be"),
    ({"fields": {"clip.vision.image_grid_pinpoints": (["112", "56"], T.ARRAY, T.STRING)}}, "ARRAY of INT32"),
    ({"fields": {"clip.vision.image_grid_pinpoints": ([56] * 1000, T.ARRAY, T.INT32)}}, "outside 2..128"),
    ({"drop_tensors": ("v.image_newline",)}, "tensor v.image_newline is missing"),
    ({"reshape": {"v.image_newline": (8, 8)}}, "v.image_newline has shape [8, 8]"),
])
def test_an_mmproj_with_bad_tiling_is_refused_before_llama_cpp(case, tmp_path, edit, needle):
    import shutil
    from hostile import rewrite_gguf
    _, _, gguf = case
    folder = tmp_path / "pair"
    shutil.copytree(gguf, folder)
    mmproj = folder / "mmproj-tiny-F16.gguf"
    rewrite_gguf(gguf / "mmproj-tiny-F16.gguf", mmproj, **edit)
    shot = tmp_path / "p.png"
    picture("wide").save(shot)
    one_error_line(cli_process("chat", shot, "-m", folder, "--quant", "F16", "-p", "hi", "--max-tokens", "1"),
                   "mmproj-tiny-F16.gguf", needle)


def test_llama_cpps_own_preprocessing_loads_the_mmproj_and_approximates(chat):
    """What llama-mtmd-cli / llama-server do with our mmproj: mtmd's llava-uhd slicer takes the whole
    picture, finds a pinpoint by its own rule and gives the overview and tiles with no unpadding and no
    image_newline — a different count (and order) from transformers' (docs/parity.md)."""
    import ctypes

    import llama_cpp.mtmd_cpp as mtmd
    image = picture("wide")
    rgb = image.tobytes()
    data = (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb)
    bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, data)
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        marker = b"<__media__>"
        text = mtmd.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
        assert mtmd.mtmd_tokenize(chat._kv.mctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        theirs = sum(mtmd.mtmd_input_chunk_get_n_tokens(mtmd.mtmd_input_chunks_get(chunks, i))
                     for i in range(mtmd.mtmd_input_chunks_size(chunks))
                     if mtmd.mtmd_input_chunk_get_type(mtmd.mtmd_input_chunks_get(chunks, i)) != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT)
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
    ours = llava_next.layout(image.height, image.width, PINPOINTS, TILE, PATCH).n_tokens
    assert theirs == 16 * (1 + 3)  # overview + the 168x56 pinpoint's three tiles, nothing unpadded or added
    assert ours == 16 + 4 * (10 + 1)  # transformers: overview + 4 rows of 10 kept columns, each with a newline


@needs_patched_build
def test_a_qwen2_llava_next_matches_transformers(tmp_path, tokenizer):
    """llava_next_qwen2: the same tiling over a Qwen2 language model (byte-level BPE, ChatML-style
    template with image parts), against transformers' processor and model."""
    from builders import HF_TEMPLATE
    from transformers import PreTrainedTokenizerFast, Qwen2Config
    text = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                       eos_token_id=tokenizer.token_to_id("<|im_end|>"), bos_token_id=None)
    config = LlavaNextConfig(
        text_config=text, vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                         num_attention_heads=2, image_size=TILE, patch_size=PATCH),
        image_token_index=tokenizer.token_to_id("<image>"), image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = build_model(config, cls=LlavaNextForConditionalGeneration)
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "qwen-next", preprocessor=PREPROCESSOR)
    manifest = convert(ckpt, out=tmp_path / "gguf", quant="F16", name="q")
    assert manifest.source["family"] == "llava_next_qwen2"
    fast = PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    processor = LlavaNextProcessor(image_processor=LlavaNextImageProcessor(**PREPROCESSOR), tokenizer=fast,
                                   patch_size=PATCH, vision_feature_select_strategy="default", image_token="<image>",
                                   num_additional_image_tokens=1, chat_template=HF_TEMPLATE)
    with VisionChat.load(tmp_path / "gguf", quant="F16", n_ctx=1024, n_gpu_layers=0) as chat:
        for name in ("wide", "tall"):
            expected, n_prompt = reference(model, processor, picture(name))
            chat.reset()
            got = chat.next_token_logprobs(QUESTION, images=[picture(name)])
            assert chat.last_turn.prompt_positions == n_prompt
            assert got[:len(expected)].argmax() == expected.argmax()
            assert top10_gap(expected, got) < IMAGE_BOUND


def served_from_disk_after_a_restart(folder, picture_path, tmp_path, model="tiny"):
    """serve --cache-dir: a conversation about ``picture_path`` saved at shutdown is restored by the next
    server (pictures and KV cache from disk, nothing encoded again) and gives the same answer."""
    from test_server import Server, user
    cache = tmp_path / "states"
    answers = []
    for round in range(2):
        server = Server(folder, "--parallel", "1", cache_dir=cache)
        try:
            reply = server.client().chat.completions.create(model=model, messages=[user(QUESTION, picture_path)],
                                                            max_tokens=5)
            answers.append(reply.choices[0].message.content)
            encoded = server.stats()["images_encoded"]
        finally:
            server.stop()
        assert encoded == (1 if round == 0 else 0)
    assert answers[0] == answers[1]
    assert reply.usage.prompt_tokens_details.cached_tokens == reply.usage.prompt_tokens - 1


def test_a_restarted_server_restores_a_tiled_picture(case, tmp_path):
    shot = tmp_path / "wide.png"
    picture("wide").save(shot)
    served_from_disk_after_a_restart(case[2], shot, tmp_path)
