"""Vision towers are plug-ins (models/clip.py, models/llava_next.py): the refactor that made them so
changed no byte of what the existing families write, and each tower answers for itself."""

from __future__ import annotations

import hashlib
from pathlib import Path

import acestep_gguf
from acestep_gguf import convert
from acestep_gguf.models import llava_next, pixtral, registry
from acestep_gguf.models.clip import CLIP

DEMO = Path(acestep_gguf.__file__).parent / "demo_model"
# sha256 of the demo checkpoint's F16 files as written by b38c42a, the commit before towers became
# plug-ins (F16 is numpy's own rounding: the same bytes on every machine; gguf is pinned to 0.19)
BEFORE = {"demo-F16.gguf": "2cf777c3a5bd8ca1dbb1be720abc6182da20466690f88780fccfba61db5e6bf7",
          "mmproj-demo-F16.gguf": "1c8d99630699ff215a230367b62cc0e63f2e36f98d41debdf017ebcb71985110"}


def test_the_existing_family_writes_the_same_bytes(tmp_path):
    convert(DEMO, out=tmp_path / "out", quant="F16", mmproj_quant="F16", name="demo")
    for name, digest in BEFORE.items():
        assert hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest() == digest, name


def test_each_family_is_a_language_model_plus_a_tower():
    towers = {f.name: f.vision for f in registry.FAMILIES}
    assert towers == {"llava_qwen2": CLIP, "llava_llama": CLIP, "llava_next_llama": llava_next.ANYRES_CLIP,
                      "llava_next_qwen2": llava_next.ANYRES_CLIP, "llava_pixtral": pixtral.PIXTRAL}
    # an mmproj names no language model: its tower is found from its own keys
    plain = {"clip.projector_type": "mlp"}
    tiled = {**plain, "clip.vision.image_grid_pinpoints": [672, 336]}
    assert registry.for_gguf(plain, "vision").vision is CLIP
    assert registry.for_gguf(tiled, "vision").vision is llava_next.ANYRES_CLIP
    assert registry.for_gguf({"clip.projector_type": "pixtral"}, "vision").vision is pixtral.PIXTRAL
    # a language file is found by architecture and vocabulary: llama.cpp's `llama` with SentencePiece or BPE
    assert registry.for_gguf({"general.architecture": "llama", "tokenizer.ggml.model": "llama"}, "language").name == "llava_llama"
    assert registry.for_gguf({"general.architecture": "llama", "tokenizer.ggml.model": "gpt2"}, "language").name == "llava_pixtral"


def test_towers_count_positions_per_picture():
    from acestep_gguf.models.presets import PRESETS
    clip, tiled = PRESETS["llava-1.5-7b"].vision, PRESETS["llava-v1.6-mistral-7b"].vision
    assert CLIP.max_image_tokens(clip) == 576 and CLIP.n_tile_positions(336, 14) == 577 == clip.v_n_pos
    assert llava_next.ANYRES_CLIP.max_image_tokens(tiled) == 2928  # five tiles of 672x672, nothing unpadded
    # transformers' own figures for a 1000x750 photo: 2340 positions (llama.cpp's approximation: 2880)
    assert llava_next.layout(750, 1000, tiled.pinpoints, 336, 14).n_tokens == 2340
    # ties go to the first pinpoint; pictures within one tile still use a pinpoint (here 336x672)
    assert llava_next.select_best_resolution(336, 336, tiled.pinpoints) == (336, 672)
    assert llava_next.select_best_resolution(100, 1000, tiled.pinpoints) == (336, 1008)


def test_pixtral_sizes_a_photo_as_transformers_does():
    """PixtralImageProcessor: 1000x750 stays (no side over 1024) and rounds up to 1008x752 — 63x47
    patches, 46 [IMG_BREAK]s and an [IMG_END]: 3008 positions (llama.cpp's own sizing gives 999)."""
    from acestep_gguf.models.presets import PRESETS
    from acestep_gguf.runtime.images import native_size
    assert native_size(1000, 750, 1024, 16) == (1008, 752)
    assert 63 * 47 + 46 + 1 == 3008
    assert native_size(3000, 1000, 1024, 16) == (1024, 352)  # floor(1000 / 2.93) = 341 -> 22 patches
    assert native_size(5, 3, 1024, 16) == (16, 16)
    assert pixtral.PIXTRAL.max_image_tokens(PRESETS["pixtral-12b"].vision) == 64 * 64 + 64


def _saved_and_read_back(tmp_path, image, recipe):
    """A conversation holding ``image`` stored by the server's state store, read back by a fresh store."""
    from acestep_gguf.runtime.chat import ChatState
    from acestep_gguf.runtime.kv_session import KVSnapshot
    from acestep_gguf.server.store import StateLimits, StateStore
    limits = StateLimits(4096, 100, recipe)
    state = ChatState([{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "hi"}]}],
                      KVSnapshot(((("i", image.digest), 30), (("t", 5), 1)), 31, b"kv-bytes"))
    StateStore(1 << 20, tmp_path, "m", limits).put(("k1",), state)
    found = StateStore(1 << 20, tmp_path, "m", limits).best(("k1",), 0)
    return found[1].messages[0]["content"][0]["image"] if found else None


def test_the_state_store_keeps_tiled_and_native_pictures(tmp_path):
    """Saved conversations (serve's --cache-dir) hold a picture's tiles and layout, or its own size, and
    a state whose picture does not fit the model's recipe is dropped, not restored."""
    from dataclasses import replace

    from PIL import Image

    from acestep_gguf.runtime.images import PixelRecipe, prepare
    tiled = PixelRecipe(56, 14, 56, 3, ((56, 112), (112, 56), (112, 112)))
    native = PixelRecipe(64, 16, 64, 3, (), 64)
    photo = Image.new("RGB", (150, 60), (10, 120, 200))
    for n, recipe in enumerate((tiled, native)):
        image = prepare(photo, recipe)
        back = _saved_and_read_back(tmp_path / f"ok{n}", image, recipe)
        assert back == image and (back.tiles or back.shape)
    bad_layout = replace(prepare(photo, tiled), layout=replace(prepare(photo, tiled).layout, keep_rows=(0, 1)))
    assert _saved_and_read_back(tmp_path / "bad1", bad_layout, tiled) is None
    bad_shape = replace(prepare(photo, native), shape=(48, 48))
    assert _saved_and_read_back(tmp_path / "bad2", bad_shape, native) is None
    # a square picture offered to a tiled model's store is refused too
    square = prepare(photo, PixelRecipe(56, 14, 56))
    assert _saved_and_read_back(tmp_path / "bad3", square, tiled) is None
