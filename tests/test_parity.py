"""Numerical parity with transformers (float32): image features, next-token log-probabilities, pixels.
Figures and the investigation behind the bounds are in docs/parity.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from acestep_gguf import VisionChat
from acestep_gguf.runtime.chat import PATCHED_BUILD
from acestep_gguf.runtime.images import PixelRecipe, prepare

PATCHED = PATCHED_BUILD in __import__("llama_cpp").__version__
needs_patched_build = pytest.mark.skipif(not PATCHED, reason="stock llama-cpp-python: llava image tokens are mis-ordered "
                                         "(llama.cpp#25814); install it with tools/build_llama_cpp.sh")

QUESTION = "What is in this picture?"
RECIPE = PixelRecipe(56, 14, 56)
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
TEXT_BOUND = 0.01  # the bound; measured 1.5e-4 (docs/parity.md)
IMAGE_BOUND = 0.005  # measured 1.1e-4: F16 weights + tanh-GELU; 40x headroom for BLAS/thread order
FEATURE_BOUND = 1e-3  # relative to the largest feature; measured 1.1e-4
Q8_0_BOUND = 0.02  # Q8_0 weights, text or image; measured up to 7.5e-3 (docs/parity.md)


def pixel_values(image) -> torch.Tensor:
    x = np.frombuffer(prepare(image, RECIPE).rgb, np.uint8).reshape(56, 56, 3).astype(np.float32) / 255.0
    return torch.from_numpy(((x - MEAN) / STD).transpose(2, 0, 1)[None].copy())


def hf_logprobs(model, tokenizer, image=None) -> np.ndarray:
    text = f"<|im_start|>user\n{'<image>' if image is not None else ''}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    image_id, n_image = tokenizer.token_to_id("<image>"), 16
    ids = [j for i in tokenizer.encode(text).ids for j in ([i] * n_image if i == image_id else [i])]
    with torch.no_grad():
        kwargs = {"pixel_values": pixel_values(image)} if image is not None else {}
        logits = model(input_ids=torch.tensor([ids]), **kwargs).logits[0, -1].double()
    return torch.log_softmax(logits, -1).numpy()


def top10_gap(reference: np.ndarray, got: np.ndarray) -> float:
    top = np.argsort(-reference)[:10]
    return float(np.abs(reference[top] - got[:len(reference)][top]).max())


@pytest.fixture(scope="module")
def chat(converted):
    with VisionChat.load(converted, quant="F16", n_gpu_layers=0) as session:
        yield session


@pytest.fixture(scope="module")
def images(noise_image):
    rng = np.random.default_rng(11)
    return {"noise": Image.open(noise_image), "square noise": Image.fromarray(rng.integers(0, 256, (56, 56, 3), np.uint8)),
            "flat": Image.new("RGB", (80, 60), (200, 40, 40))}


def test_text_only_logprobs_match_transformers(chat, tiny_model, tokenizer):
    reference = hf_logprobs(tiny_model, tokenizer)
    got = chat.next_token_logprobs(QUESTION)
    assert got[:len(reference)].argmax() == reference.argmax()
    assert top10_gap(reference, got) < TEXT_BOUND


def test_the_installed_llama_cpp_is_the_patched_build():
    """Image parity below is skipped on a stock build; the README's setup (and CI) must not be one."""
    import llama_cpp
    assert PATCHED, f"llama-cpp-python {llama_cpp.__version__} is not {PATCHED_BUILD}: run tools/build_llama_cpp.sh"


@needs_patched_build
@pytest.mark.parametrize("which", ["noise", "square noise", "flat"])
def test_image_logprobs_match_transformers(chat, tiny_model, tokenizer, images, which):
    reference = hf_logprobs(tiny_model, tokenizer, images[which])
    got = chat.next_token_logprobs(QUESTION, images=[images[which]])
    assert chat.last_turn.images_encoded == 1
    assert got[:len(reference)].argmax() == reference.argmax()
    assert top10_gap(reference, got) < IMAGE_BOUND
    # the bound is meaningful: another picture moves the distribution by far more
    other = "flat" if which != "flat" else "noise"
    assert top10_gap(reference, hf_logprobs(tiny_model, tokenizer, images[other])) > 5 * top10_gap(reference, got)


def encode_with_llama(chat, image) -> np.ndarray:
    return chat.encode_image(image)


@needs_patched_build
def test_image_features_match_transformers(chat, tiny_model, images):
    """mtmd's projected image tokens equal LlavaForConditionalGeneration.get_image_features."""
    with torch.no_grad():
        vision = tiny_model.model.vision_tower(pixel_values(images["noise"]), output_hidden_states=True)
        reference = tiny_model.model.multi_modal_projector(vision.hidden_states[-2][:, 1:])[0].numpy()
    got = encode_with_llama(chat, images["noise"])
    assert got.shape == reference.shape == (16, 64)
    assert np.abs(got - reference).max() / np.abs(reference).max() < FEATURE_BOUND


@needs_patched_build
def test_the_llava_cls_order_defect_would_be_caught(chat, tiny_model, images):
    """Stock llama.cpp 0.3.36 puts [CLS] after the patches (ggml-org/llama.cpp#25814); the build our
    README installs fixes it. Simulate the defect in PyTorch: it is far outside our bound."""
    with torch.no_grad():
        tower = tiny_model.model.vision_tower
        emb = tower.embeddings
        patches = emb.patch_embedding(pixel_values(images["noise"])).flatten(2).transpose(1, 2)
        x = torch.cat([patches, emb.class_embedding.reshape(1, 1, -1)], 1) + emb.position_embedding.weight[None]
        x = tower.pre_layrnorm(x)
        for layer in tower.encoder.layers[:2]:
            out = layer(x, None)
            x = out[0] if isinstance(out, tuple) else out
        defect = tiny_model.model.multi_modal_projector(x[:, 1:])[0].numpy()
    got = encode_with_llama(chat, images["noise"])
    assert np.abs(got - defect).max() / np.abs(defect).max() > 50 * FEATURE_BOUND


def test_pixel_preparation_matches_clip_image_processor(images):
    processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    for image in (images["noise"], images["flat"], Image.new("RGB", (300, 90), (10, 200, 30))):
        reference = processor(images=image, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(pixel_values(image)[0].numpy(), reference, atol=1e-5)


@needs_patched_build
def test_q8_0_logprobs_match_transformers(converted, tiny_model, tokenizer, images):
    with VisionChat.load(converted, quant="Q8_0", n_gpu_layers=0) as q8:
        for picture in (None, images["noise"]):
            q8.reset()
            reference = hf_logprobs(tiny_model, tokenizer, picture)
            got = q8.next_token_logprobs(QUESTION, images=[picture] if picture is not None else [])
            assert got[:len(reference)].argmax() == reference.argmax()
            assert top10_gap(reference, got) < Q8_0_BOUND
