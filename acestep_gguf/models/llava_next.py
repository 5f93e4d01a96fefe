"""LLaVA-NeXT (LLaVA-1.6, ``LlavaNextForConditionalGeneration``): llava-1.5's CLIP tower and MLP
projector, but a picture is seen at "any resolution" — everything about that lives here.

transformers' recipe, mirrored exactly (llava-hf/llava-v1.6-*-hf):
- ``LlavaNextImageProcessor``: the best of ``image_grid_pinpoints`` (each is [height, width]; the
  largest effective resolution, then the least waste; the first of equals wins), the picture resized
  into it keeping its aspect (the fitted side ceil'ed) and centred on black, cut into tiles of the
  tower's size row by row; before them an overview, the whole picture squashed to one tile.
- ``LlavaNextForConditionalGeneration.pack_image_features``: the overview's features first, then
  the tiles' features as one grid, unpadded back to the picture's aspect (``int(round(x, 7))``,
  ``(current - new) // 2`` rows or columns off each side) with ``image_newline`` after every row.

The mmproj is llava-1.5's plus ``v.image_newline`` and ``clip.vision.image_grid_pinpoints`` (as
[width, height] pairs, the order clip.cpp reads), so llama.cpp's own tools load it too — with their
approximation (runtime/anyres.py says how ours differs)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf import GGUFValueType as T

from ..errors import ConfigError
from .clip import PINPOINTS_KEY, VISION_KEYS, ClipHParams, ClipTower, Fields
from .family import Family
from .fields import MAX_IMAGE
from .llava_llama import LLAMA
from .llava_qwen2 import QWEN2
from .spec import MetadataEntry, TensorSpec, expand

ARCHITECTURE = "LlavaNextForConditionalGeneration"
# LlavaNextConfig's default pinpoints ([height, width]), for a config that leaves them out.
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
MAX_PINPOINTS = 64  # real checkpoints list 5 (llava-1.6) to 36 (onevision)
MAX_TILES = 64  # tiles in one pinpoint: each is a full pass of the vision tower
NEWLINE_TENSOR = "v.image_newline"
NEWLINE = (("projector.image_newline", NEWLINE_TENSOR, ("n_embd",)),)
MERGE_KEY = "clip.vision.mm_patch_merge_type"


@dataclass(frozen=True)
class AnyresLayout:
    """How one picture is cut and packed: the chosen pinpoint's grid of tiles, and which rows and
    columns of the tiles' feature grid survive unpadding."""

    height: int  # the picture's own size, as the processor's image_sizes
    width: int
    rows: int  # tiles down and across the chosen pinpoint
    cols: int
    side: int  # features per tile side (tile // patch)
    keep_rows: tuple[int, int]  # [start, stop) of the feature grid's rows after unpadding
    keep_cols: tuple[int, int]

    @property
    def n_tokens(self) -> int:
        """Language-model positions: the overview, then each kept row plus its image_newline."""
        h = self.keep_rows[1] - self.keep_rows[0]
        w = self.keep_cols[1] - self.keep_cols[0]
        return self.side * self.side + h * (w + 1)


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The (height, width) pinpoint transformers picks for a picture (image_processing_utils)."""
    best, best_effective, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = ph * pw - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (ph, pw), effective, waste
    return best


def fitted_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """The (height, width) of a picture resized into a pinpoint keeping its aspect (get_patch_output_size)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def layout(height: int, width: int, pinpoints, tile: int, patch: int) -> AnyresLayout:
    """The layout of a height x width picture (unpad_image and _get_unpadded_features)."""
    ph, pw = select_best_resolution(height, width, pinpoints)
    rows, cols, side = ph // tile, pw // tile, tile // patch
    current_h, current_w = rows * side, cols * side
    if width / height > current_w / current_h:
        new_h = int(round(height * (current_w / width), 7))
        pad = (current_h - new_h) // 2
        keep_rows, keep_cols = (pad, current_h - pad), (0, current_w)
    else:
        new_w = int(round(width * (current_h / height), 7))
        pad = (current_w - new_w) // 2
        keep_rows, keep_cols = (0, current_h), (pad, current_w - pad)
    return AnyresLayout(height, width, rows, cols, side, keep_rows, keep_cols)


def pack(features: np.ndarray, where: AnyresLayout, newline: np.ndarray) -> np.ndarray:
    """The language model's image embeddings from per-tile features (overview first, then the tiles
    row-major; n_tiles x side² x n_embd), as pack_image_features arranges them."""
    side, rows, cols = where.side, where.rows, where.cols
    grid = features[1:].reshape(rows, cols, side, side, -1).transpose(0, 2, 1, 3, 4).reshape(rows * side, cols * side, -1)
    grid = grid[where.keep_rows[0]:where.keep_rows[1], where.keep_cols[0]:where.keep_cols[1]]
    lines = np.broadcast_to(newline.astype(grid.dtype), (grid.shape[0], 1, grid.shape[2]))
    return np.concatenate([features[0], np.concatenate([grid, lines], axis=1).reshape(-1, grid.shape[2])])


def max_tokens(pinpoints, tile: int, patch: int) -> int:
    """The most positions any picture can take: a picture of a pinpoint's own shape loses nothing to
    unpadding, so the worst case is the largest pinpoint's full grid (2928 for llava-1.6's 672x672)."""
    side = tile // patch
    return max(side * side + (ph // tile) * side * ((pw // tile) * side + 1) for ph, pw in pinpoints)


@dataclass(frozen=True)
class AnyresHParams(ClipHParams):
    pinpoints: tuple = ()  # ((height, width), ...): whole numbers of tiles


class AnyresClipTower(ClipTower):
    """CLIP + MLP projector + image_newline, tiled by image_grid_pinpoints."""

    name = "clip-anyres"
    replacements = ClipTower.replacements + (("model.image_newline", "projector.image_newline"),  # transformers 5
                                             ("image_newline", "projector.image_newline"))  # hub checkpoints
    keys = {**VISION_KEYS, PINPOINTS_KEY: (T.ARRAY, T.INT32, True, (2, 2 * MAX_PINPOINTS)),
            MERGE_KEY: (T.STRING, None, False, None)}

    def hparams(self, vision: Fields, top: Fields, preprocessor: Fields, tokenizer: dict | None = None,
                n_embd: int = 0) -> AnyresHParams:
        h = super().hparams(vision, top, preprocessor, tokenizer, n_embd)
        pinpoints = _pinpoints(top, h.v_image)
        if "image_grid_pinpoints" in preprocessor.data and _pinpoints(preprocessor, h.v_image) != pinpoints:
            raise ConfigError("preprocessor_config.json: image_grid_pinpoints differ from config.json's; the processor "
                              "and the model would disagree on every picture's tiles")
        if h.resize_shortest_edge != h.v_image:
            raise ConfigError(f"preprocessor_config.json: size {h.resize_shortest_edge} differs from the "
                              f"{h.v_image}-pixel tile; LLaVA-NeXT tiles are encoded at the tower's size")
        return AnyresHParams(**vars(h), pinpoints=tuple(pinpoints))

    def tensors(self, h: AnyresHParams) -> list[TensorSpec]:
        return super().tensors(h) + expand(NEWLINE, h, "vision")

    def metadata(self, h: AnyresHParams) -> list[MetadataEntry]:
        flat = [side for ph, pw in h.pinpoints for side in (pw, ph)]  # clip.cpp reads width first
        return super().metadata(h) + [MetadataEntry(PINPOINTS_KEY, flat, T.ARRAY, T.INT32),
                                      MetadataEntry(MERGE_KEY, "spatial_unpad", T.STRING)]

    def max_image_tokens(self, h: AnyresHParams) -> int:
        return max_tokens(h.pinpoints, h.v_image, h.v_patch)

    def mmproj_bytes(self, h: AnyresHParams, matrix_type) -> int:
        return super().mmproj_bytes(h, matrix_type) + 4 * h.n_embd  # + image_newline

    def pixel_strategy(self, h: AnyresHParams) -> dict:
        return {"pinpoints": h.pinpoints}  # tiles (runtime/images.py)

    def reads(self, fields: dict) -> bool:
        return fields.get("clip.projector_type") == self.projector_type and PINPOINTS_KEY in fields

    def gguf_hparams(self, fields: dict) -> AnyresHParams:
        flat = fields[PINPOINTS_KEY]
        return AnyresHParams(**vars(super().gguf_hparams(fields)),
                             pinpoints=tuple((flat[i + 1], flat[i]) for i in range(0, len(flat) - 1, 2)))

    def gguf_problems(self, h: AnyresHParams, fields: dict) -> list[str]:
        flat, tile = fields[PINPOINTS_KEY], h.v_image
        bad = (len(flat) % 2 or any(not 0 < s <= MAX_IMAGE or s % tile for s in flat)
               or any((ph // tile) * (pw // tile) > MAX_TILES for ph, pw in h.pinpoints))
        return super().gguf_problems(h, fields) + ([
            f"{PINPOINTS_KEY} must be (width, height) pairs, multiples of the {tile}-pixel tile up to {MAX_IMAGE}, "
            f"at most {MAX_TILES} tiles each"] if bad else [])


def _pinpoints(fields: Fields, tile: int) -> list[tuple[int, int]]:
    """image_grid_pinpoints as (height, width) pairs: bounded, whole tiles."""
    where = fields.name("image_grid_pinpoints")
    value = fields.data.get("image_grid_pinpoints", DEFAULT_PINPOINTS)
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PINPOINTS:
        raise ConfigError(f"{where} must be a list of 1 to {MAX_PINPOINTS} [height, width] pairs")
    pairs = []
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and all(type(s) is int and 0 < s <= MAX_IMAGE for s in pair)):
            raise ConfigError(f"{where}: {str(pair)[:40]} is not a [height, width] pair of whole numbers up to {MAX_IMAGE}")
        if pair[0] % tile or pair[1] % tile:
            raise ConfigError(f"{where}: {pair} is not a whole number of {tile}-pixel tiles (vision_config.image_size)")
        if (pair[0] // tile) * (pair[1] // tile) > MAX_TILES:
            raise ConfigError(f"{where}: {pair} is more than {MAX_TILES} tiles")
        pairs.append((pair[0], pair[1]))
    return pairs


ANYRES_CLIP = AnyresClipTower()
FAMILY_LLAMA = Family(name="llava_next_llama", architectures=(ARCHITECTURE,), language=LLAMA, vision=ANYRES_CLIP,
                      description="Llama, Mistral or Yi + CLIP at any resolution (LLaVA-NeXT / LLaVA-1.6)")
FAMILY_QWEN2 = Family(name="llava_next_qwen2", architectures=(ARCHITECTURE,), language=QWEN2, vision=ANYRES_CLIP,
                      description="Qwen2 + CLIP at any resolution (LLaVA-NeXT)")
