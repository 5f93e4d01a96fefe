"""Hyper-parameters as typed values: what config.json (validated field by field), a GGUF header or a
model card says about a language model and a vision tower, in the converter's names (llama.cpp's,
mostly). The converter, the runtime's checks, the planner and the presets all use these types."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextHParams:
    """The language model."""

    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float = 1e-6
    max_pos: int = 0  # max_position_embeddings
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "yarn" | "linear", "factor", ...}
    tie_word_embeddings: bool = False
    sliding_window: int | None = None

    @property
    def n_q(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_kv(self) -> int:
        return self.n_head_kv * self.head_dim


@dataclass(frozen=True)
class VisionHParams:
    """What every vision tower has; a tower module subclasses it with its own fields."""

    n_embd: int  # the projector's output: the language model's width
    v_embd: int
    v_ff: int
    v_head: int
    v_image: int  # image_size: the tile (CLIP) or the largest picture (Pixtral)
    v_patch: int
    v_feature_layer: int  # encoder layers written and run (vision_feature_layer resolved)
    v_n_layer: int = 0  # encoder layers in the checkpoint
    v_n_pos: int = 0  # positions inside the encoder for one tile (the planner's activations)
    v_eps: float = 1e-5
    v_act: str = ""
    image_mean: tuple = ()
    image_std: tuple = ()
    resample: int = 3  # PIL's resampling filter


@dataclass(frozen=True)
class HParams:
    """A whole model: the language model and its tower (the two GGUF files)."""

    text: TextHParams
    vision: VisionHParams
