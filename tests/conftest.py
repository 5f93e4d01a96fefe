"""Shared fixtures: real tiny checkpoints built with transformers, and their conversions."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from builders import build_model, build_tokenizer, save_checkpoint, tiny_config  # noqa: E402

from acestep_gguf import convert  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return build_model(tiny_config(tokenizer))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model, tokenizer) -> Path:
    """transformers-5 save_pretrained names, F32, one file."""
    return save_checkpoint(tiny_model, tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny-llava")


@pytest.fixture(scope="session")
def converted(tmp_path_factory, tiny_checkpoint) -> Path:
    """F16 + Q8_0 language models, F16 mmproj."""
    out = tmp_path_factory.mktemp("gguf") / "tiny-gguf"
    convert(tiny_checkpoint, out=out, quant="F16,Q8_0", mmproj_quant="F16")
    return out


@pytest.fixture()
def fresh_checkpoint(tmp_path, tiny_model, tokenizer):
    """A private copy to break in a test: save_checkpoint(**kwargs) → folder."""
    def make(name="ckpt", **kwargs):
        return save_checkpoint(tiny_model, tokenizer, tmp_path / name, **kwargs)
    return make


@pytest.fixture(scope="session")
def noise_image(tmp_path_factory) -> Path:
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("img") / "noise.png"
    Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def second_image(tmp_path_factory) -> Path:
    rng = np.random.default_rng(8)
    path = tmp_path_factory.mktemp("img") / "second.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 100, 3), dtype=np.uint8)).save(path, quality=95)
    return path


def pytest_configure(config):
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def endless(tmp_path_factory, tiny_model, tokenizer) -> Path:
    """A converted model whose replies never end by themselves (greedy): the lm_head rows of every
    special token are zero, so their logit 0 always loses to some positive one. Cancels, closes and
    Ctrl-C then always land in the middle of a generation."""
    import copy
    from builders import SPECIALS
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for text in SPECIALS:
            model.lm_head.weight[tokenizer.token_to_id(text)] = 0.0
    ckpt = save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("endless") / "endless")
    out = tmp_path_factory.mktemp("endless-gguf") / "endless-gguf"
    convert(ckpt, out=out, quant="F16", mmproj_quant="F16")
    return out
