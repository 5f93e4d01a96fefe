"""Vision towers are plug-ins (models/clip.py, models/llava_next.py): the refactor that made them so
changed no byte of what the existing families write, and each tower answers for itself."""

from __future__ import annotations

import hashlib
from pathlib import Path

import acestep_gguf
from acestep_gguf import convert
from acestep_gguf.models import llava_next, registry
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
                      "llava_next_qwen2": llava_next.ANYRES_CLIP}
    # an mmproj names no language model: its tower is found from its own keys
    plain = {"clip.projector_type": "mlp"}
    tiled = {**plain, "clip.vision.image_grid_pinpoints": [672, 336]}
    assert registry.for_gguf(plain, "vision").vision is CLIP
    assert registry.for_gguf(tiled, "vision").vision is llava_next.ANYRES_CLIP


def test_towers_count_positions_per_picture():
    h = {"v_image": 336, "v_patch": 14, "pinpoints": [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]}
    assert CLIP.max_image_tokens(h) == 576 and CLIP.n_tile_positions(336, 14) == 577
    assert llava_next.ANYRES_CLIP.max_image_tokens(h) == 2928  # five tiles of 672x672, nothing unpadded
    # transformers' own figures for a 1000x750 photo: 2340 positions (llama.cpp's approximation: 2880)
    assert llava_next.layout(750, 1000, h["pinpoints"], 336, 14).n_tokens == 2340
    # ties go to the first pinpoint; pictures within one tile still use a pinpoint (here 336x672)
    assert llava_next.select_best_resolution(336, 336, h["pinpoints"]) == (336, 672)
    assert llava_next.select_best_resolution(100, 1000, h["pinpoints"]) == (336, 1008)
