"""What a vision-tower plug-in provides (models/clip.py, llava_next.py, pixtral.py): the contract a
Family relies on, so that adding an encoder is one module implementing it."""

from __future__ import annotations

from typing import Protocol

from .fields import Fields
from .hparams import VisionHParams
from .spec import Ignored, MetadataEntry, TensorSpec


class VisionTower(Protocol):
    name: str  # for messages and `info`
    model_types: tuple[str, ...]  # vision_config.model_type values it reads
    projector_type: str  # clip.projector_type of its mmproj
    replacements: tuple  # (source prefix, canonical prefix) pairs of its tensors
    keys: dict  # mmproj key -> (type, element type, required, bounds), as llama.cpp demands them

    def hparams(self, vision: Fields, top: Fields, preprocessor: Fields, tokenizer: dict | None = None,
                n_embd: int = 0) -> VisionHParams:
        """Validated from config.json's vision_config and the llava config around it, preprocessor_config.json
        and (when a token's id is needed) tokenizer.json."""

    def tensors(self, h: VisionHParams) -> list[TensorSpec]: ...

    def ignored(self, h: VisionHParams) -> list[Ignored]: ...

    def metadata(self, h: VisionHParams) -> list[MetadataEntry]: ...

    def n_tile_positions(self, image_size: int, patch_size: int) -> int:
        """Positions inside the encoder for one pass (the planner's activations)."""

    def max_image_tokens(self, h: VisionHParams) -> int:
        """The most language-model positions one picture can take."""

    def mmproj_bytes(self, h: VisionHParams, matrix_type) -> int: ...

    def pixel_strategy(self, h: VisionHParams) -> dict:
        """runtime/images.py's PixelRecipe fields beyond the square crop."""

    def reads(self, fields: dict) -> bool:
        """Whether an mmproj's metadata is this tower's."""

    def gguf_hparams(self, fields: dict) -> VisionHParams: ...

    def gguf_problems(self, h: VisionHParams, fields: dict) -> list[str]: ...
