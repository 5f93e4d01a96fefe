"""Pixtral's vision tower with llava's two-layer projector (``LlavaForConditionalGeneration`` whose
``vision_config.model_type`` is ``pixtral``: mistral-community/pixtral-12b) — llama.cpp's ``pixtral``
mmproj. Everything about it lives here.

What differs from CLIP: pictures at their own resolution (no crop, no tiles), 16 px patches with 2D
RoPE (llama.cpp fixes its theta at 10000), RMSNorm (eps 1e-5, hard-coded in transformers' code too), a
gated FFN, no [CLS] and no position embeddings; after every row of patches but the last an
``[IMG_BREAK]`` (the language model's own embedding of it, copied into the mmproj as
``v.token_embd.img_break``), and ``[IMG_END]`` after the picture (mtmd writes both).

Pixels as ``PixtralImageProcessor`` makes them: scaled down so the longest edge fits ``longest_edge``
(floor), then each side resized *up* to a multiple of the patch (no padding). mtmd is then handed a
picture it need not resize (the runtime lifts mtmd's own token limits to the tower's)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from gguf import MODEL_TENSOR as MT
from gguf import GGUFValueType as T
from gguf import Keys

from ..errors import ConfigError
from ..quant_types import tensor_bytes
from .clip import (CLIP_MEAN, CLIP_STD, PIL_BICUBIC, REPLACEMENTS, RESAMPLE_KEY, VISION_KEYS, Fields, check_projector,
                   feature_layer, tn, tower_gguf_hparams, tower_metadata, tower_problems)
from .family import Family, LanguageModel
from .fields import MAX_HEADS, MAX_IMAGE, MAX_LAYERS, MAX_WIDTH
from .hparams import VisionHParams
from .llava_llama import MISTRAL_DEFAULTS
from .spec import Ignored, MetadataEntry, TensorSpec, expand
from .text_hparams import rope_theta

LONGEST_EDGE_KEY = "acestep_gguf.image.longest_edge"
IMG_BREAK = "[IMG_BREAK]"
ROPE_THETA = 10000.0  # clip.cpp's pixtral graph uses this and reads no key for it
RMS_EPS = 1e-5  # PixtralRMSNorm(eps=1e-5) in transformers; the config has no field for it
ACTIVATIONS = {"silu": Keys.ClipVision.USE_SILU, "gelu": Keys.ClipVision.USE_GELU}

VISION = (
    ("vision.patch_conv.weight", tn(MT.V_ENC_EMBD_PATCH, ".weight"), ("v_embd", 3, "v_patch", "v_patch")),
    ("vision.ln_pre.weight", tn(MT.V_PRE_NORM, ".weight"), ("v_embd",)),
    ("projector.linear_1.weight", tn(MT.V_MMPROJ, ".weight").format(bid=1), ("n_embd", "v_embd")),
    ("projector.linear_1.bias", tn(MT.V_MMPROJ, ".bias").format(bid=1), ("n_embd",)),
    ("projector.linear_2.weight", tn(MT.V_MMPROJ, ".weight").format(bid=2), ("n_embd", "n_embd")),
    ("projector.linear_2.bias", tn(MT.V_MMPROJ, ".bias").format(bid=2), ("n_embd",)),
)
_L = "vision.transformer.layers.{bid}."
VISION_BLOCK = (
    (_L + "attention_norm.weight", tn(MT.V_ENC_INPUT_NORM, ".weight"), ("v_embd",)),
    (_L + "attention.q_proj.weight", tn(MT.V_ENC_ATTN_Q, ".weight"), ("v_embd", "v_embd")),
    (_L + "attention.k_proj.weight", tn(MT.V_ENC_ATTN_K, ".weight"), ("v_embd", "v_embd")),
    (_L + "attention.v_proj.weight", tn(MT.V_ENC_ATTN_V, ".weight"), ("v_embd", "v_embd")),
    (_L + "attention.o_proj.weight", tn(MT.V_ENC_ATTN_O, ".weight"), ("v_embd", "v_embd")),
    (_L + "ffn_norm.weight", tn(MT.V_ENC_POST_ATTN_NORM, ".weight"), ("v_embd",)),
    (_L + "feed_forward.gate_proj.weight", tn(MT.V_ENC_FFN_GATE, ".weight"), ("v_ff", "v_embd")),
    (_L + "feed_forward.up_proj.weight", tn(MT.V_ENC_FFN_UP, ".weight"), ("v_ff", "v_embd")),
    (_L + "feed_forward.down_proj.weight", tn(MT.V_ENC_FFN_DOWN, ".weight"), ("v_embd", "v_ff")),
)
# transformers rotates q/k halves (rotate_half), llama.cpp's 2D rope adjacent pairs: un-permuted per head
ROPE_ROWS = (tn(MT.V_ENC_ATTN_Q, ".weight"), tn(MT.V_ENC_ATTN_K, ".weight"))
IMG_BREAK_TENSOR = tn(MT.V_TOK_EMBD_IMG_BREAK)

KEYS = {**{k: v for k, v in VISION_KEYS.items() if not k.startswith(("clip.vision.image_grid", "clip.vision.mm_patch",
                                                                      "acestep_gguf.image.resize"))},
        LONGEST_EDGE_KEY: (T.UINT32, None, False, (1, MAX_IMAGE))}


@dataclass(frozen=True)
class PixtralHParams(VisionHParams):
    longest_edge: int = 0  # PixtralImageProcessor's size.longest_edge (at most v_image)
    img_break: int = 0  # the [IMG_BREAK] token's id: its embedding row is copied into the mmproj


class PixtralTower:
    """Pixtral ViT + llava's projector, one picture at its own resolution."""

    name = "pixtral"
    model_types = ("pixtral",)
    projector_type = "pixtral"
    replacements = REPLACEMENTS
    keys = KEYS

    # -- what the tower is in a checkpoint -------------------------------------------------------
    def hparams(self, vision: Fields, top: Fields, preprocessor: Fields, tokenizer: dict | None = None,
                n_embd: int = 0) -> PixtralHParams:
        v_embd, v_head = vision.integer("hidden_size", 1, MAX_WIDTH, 1024), vision.integer("num_attention_heads", 1, MAX_HEADS, 16)
        v_n_layer = vision.integer("num_hidden_layers", 1, MAX_LAYERS, 24)
        v_image, v_patch = vision.integer("image_size", 1, MAX_IMAGE, 1024), vision.integer("patch_size", 1, MAX_IMAGE, 16)
        if vision.integer("num_channels", 1, 4, 3) != 3:
            raise ConfigError("config.json: vision_config.num_channels must be 3 (RGB)")
        if v_embd % v_head or (v_embd // v_head) % 4:
            raise ConfigError("config.json: vision_config.hidden_size / num_attention_heads must be a multiple of 4 "
                              "(Pixtral's 2D rope splits each head in four)")
        if vision.integer("head_dim", 1, MAX_WIDTH, v_embd // v_head) != v_embd // v_head:
            raise ConfigError("config.json: vision_config.head_dim differs from hidden_size / num_attention_heads")
        if v_image % v_patch:
            raise ConfigError("config.json: vision_config.image_size is not a multiple of patch_size")
        v_act = vision.string("hidden_act", "gelu")
        if v_act not in ACTIVATIONS:
            raise ConfigError(f"config.json: vision_config.hidden_act {v_act!r} is not supported by llama.cpp's "
                              "pixtral graph (silu or gelu)")
        theta = rope_theta(vision)  # transformers' precedence: rope_parameters, then the top-level field
        if theta != ROPE_THETA:
            raise ConfigError(f"config.json: vision_config rope theta {theta:g}: llama.cpp's pixtral graph uses "
                              f"{ROPE_THETA:g} and cannot be told another")
        if top.string("vision_feature_select_strategy", "default") != "full":
            raise ConfigError("config.json: vision_feature_select_strategy must be 'full' for a Pixtral tower: it has "
                              "no [CLS] token, and 'default' would drop its first patch (llama.cpp cannot)")
        check_projector(top)
        return PixtralHParams(n_embd=n_embd, v_embd=v_embd, v_ff=vision.integer("intermediate_size", 1, MAX_WIDTH, 4096),
                              v_head=v_head, v_image=v_image, v_patch=v_patch,
                              v_feature_layer=feature_layer(top, v_n_layer), v_n_layer=v_n_layer,
                              v_n_pos=self.n_tile_positions(v_image, v_patch), v_eps=RMS_EPS, v_act=v_act,
                              img_break=_token_id(tokenizer or {}, IMG_BREAK),
                              **_preprocessing(preprocessor, v_image, v_patch))

    def tensors(self, h: PixtralHParams) -> list[TensorSpec]:
        specs = expand(VISION, h, "vision") + expand(VISION_BLOCK, h, "vision", h.v_feature_layer)
        specs = [replace(s, rope_heads=h.v_head) if s.gguf_name.endswith(ROPE_ROWS) else s for s in specs]
        # the language model's [IMG_BREAK] row, copied: mtmd puts it after every row of patches
        return specs + [TensorSpec("text.embed_tokens.weight", IMG_BREAK_TENSOR, (h.n_embd,), "vision", row=h.img_break)]

    def ignored(self, h: PixtralHParams) -> list[Ignored]:
        return [Ignored(source.format(bid=bid), "after vision_feature_layer: never computed")
                for bid in range(h.v_feature_layer, h.v_n_layer) for source, _, _ in VISION_BLOCK]

    def metadata(self, h: PixtralHParams) -> list[MetadataEntry]:
        V = Keys.ClipVision
        return tower_metadata(self.projector_type, h) + [
            MetadataEntry(V.IMAGE_MEAN, list(h.image_mean), T.ARRAY, T.FLOAT32),
            MetadataEntry(V.IMAGE_STD, list(h.image_std), T.ARRAY, T.FLOAT32),
            MetadataEntry(ACTIVATIONS[h.v_act], True, T.BOOL),
            MetadataEntry(LONGEST_EDGE_KEY, h.longest_edge, T.UINT32),
            MetadataEntry(RESAMPLE_KEY, h.resample, T.UINT32),
        ]

    # -- positions a picture takes ---------------------------------------------------------------
    def n_tile_positions(self, image_size: int, patch_size: int) -> int:
        """Positions inside the encoder for the largest picture (no [CLS])."""
        return (image_size // patch_size) ** 2

    def max_image_tokens(self, h: PixtralHParams) -> int:
        """The largest picture: every patch, an [IMG_BREAK] per row but the last, and [IMG_END]."""
        side = (h.longest_edge or h.v_image) // h.v_patch
        return side * side + side

    def mmproj_bytes(self, h: PixtralHParams, matrix_type) -> int:
        """A model card's mmproj size: matrices in ``matrix_type``, the patch kernel F32 (what convert writes:
        ggml's im2col), vectors F32."""
        v, ff, e = h.v_embd, h.v_ff, h.n_embd
        per_layer = tensor_bytes(matrix_type, 4 * v * v + 3 * v * ff) + 4 * 2 * v
        fixed = 4 * (v * 3 * h.v_patch ** 2 + v + e)  # patch kernel, ln_pre, [IMG_BREAK]
        return h.v_feature_layer * per_layer + fixed + tensor_bytes(matrix_type, v * e + e * e) + 4 * 2 * e

    def pixel_strategy(self, h: PixtralHParams) -> dict:
        return {"longest_edge": h.longest_edge}  # the picture's own aspect (runtime/images.py)

    # -- reading an mmproj back ------------------------------------------------------------------
    def reads(self, fields: dict) -> bool:
        return fields.get(Keys.Clip.PROJECTOR_TYPE) == self.projector_type

    def gguf_hparams(self, fields: dict) -> PixtralHParams:
        shape = tower_gguf_hparams(fields)
        return PixtralHParams(**shape, longest_edge=fields.get(LONGEST_EDGE_KEY, shape["v_image"]),
                              v_n_pos=self.n_tile_positions(shape["v_image"], shape["v_patch"]))

    def gguf_problems(self, h: PixtralHParams, fields: dict) -> list[str]:
        checks = [
            (h.v_embd % h.v_head == 0 and (h.v_embd // h.v_head) % 4,
             "clip.vision.embedding_length / attention.head_count is not a multiple of 4"),
            (not h.v_patch <= h.longest_edge <= h.v_image, f"{LONGEST_EDGE_KEY} is outside patch_size..image_size"),
            ("clip.vision.spatial_merge_size" in fields, "clip.vision.spatial_merge_size (a patch merger) is not supported"),
        ]
        return tower_problems(h, fields) + [message for bad, message in checks if bad]


def _token_id(tokenizer: dict, text: str) -> int:
    """The id of a token of tokenizer.json (added tokens first, then the vocabulary)."""
    for added in tokenizer.get("added_tokens") or []:
        if isinstance(added, dict) and added.get("content") == text and type(added.get("id")) is int:
            return added["id"]
    model = tokenizer.get("model") if isinstance(tokenizer.get("model"), dict) else {}
    vocab = model.get("vocab") if isinstance(model.get("vocab"), dict) else {}
    if type(vocab.get(text)) is int:
        return vocab[text]
    raise ConfigError(f"tokenizer.json: no {text} token; a Pixtral model marks the end of each row of patches with it")


def _preprocessing(pre: Fields, image_size: int, patch: int) -> dict:
    """PixtralImageProcessor's recipe: longest edge, patch, mean/std, resampling (its defaults when absent)."""
    size = pre.section("size", pre.data.get("size", {"longest_edge": image_size}))
    longest = size.integer("longest_edge", 1, MAX_IMAGE, image_size)
    patches = pre.data.get("patch_size", {"height": patch, "width": patch})
    patch_fields = pre.section("patch_size", patches) if isinstance(patches, dict) else None
    sides = (patch_fields.integer("height", 1, MAX_IMAGE), patch_fields.integer("width", 1, MAX_IMAGE)) \
        if patch_fields else (pre.integer("patch_size", 1, MAX_IMAGE),) * 2
    if sides != (patch, patch):
        raise ConfigError(f"preprocessor_config.json: patch_size {sides[0]}x{sides[1]} differs from the tower's {patch}")
    if not patch <= longest <= image_size:
        raise ConfigError(f"preprocessor_config.json: size.longest_edge {longest} is outside {patch}..{image_size} "
                          "(the tower's rope covers image_size)")
    return {"image_mean": tuple(pre.numbers("image_mean", 3, CLIP_MEAN)),
            "image_std": tuple(pre.numbers("image_std", 3, CLIP_STD)),
            "longest_edge": longest, "resample": pre.integer("resample", 0, 5, PIL_BICUBIC)}


# mistral-community/pixtral-12b's chat template (BOS from the template itself, string replies), used
# only when the checkpoint's own cannot render the runtime's conversations.
PIXTRAL_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '[INST]' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}{%- for chunk in message['content'] %}"
    "{%- if chunk['type'] == 'text' %}{{- chunk['text'] }}{%- elif chunk['type'] == 'image' %}{{- '[IMG]' }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}{%- for chunk in message['content'] %}"
    "{{- chunk['text'] }}{%- endfor %}{%- endif %}{{- eos_token }}"
    "{%- endif %}{%- endfor %}"
)
# Pixtral's language model: a Mistral (llama.cpp's `llama`) with a byte-level BPE vocabulary whose
# split is Llama-3's (llama.cpp's `pixtral` pre-tokenizer), not a SentencePiece one.
MISTRAL_BPE = LanguageModel(gguf_arch="llama", model_types=("mistral",), tokenizer="gpt2", qkv_bias=False,
                            builtin_template=PIXTRAL_TEMPLATE, rope_permute=True,
                            config_defaults={"mistral": MISTRAL_DEFAULTS},
                            is_70b=lambda h: h.n_layer == 80 and h.n_head != h.n_head_kv)
PIXTRAL = PixtralTower()
FAMILY = Family(name="llava_pixtral", architectures=("LlavaForConditionalGeneration",), language=MISTRAL_BPE,
                vision=PIXTRAL, description="Mistral + Pixtral at native resolution (Pixtral-12B)")
