"""The CLIP vision tower with llava's two-layer MLP projector, as one plug-in: everything the
converter, runtime and planner need to know about it — the checkpoint's tensor names and shapes, the
hyper-parameters config.json and preprocessor_config.json give it, the mmproj's ``clip.*`` keys (and
the types llama.cpp demands of them), how many positions a picture takes, and how its pixels are made
(shortest edge to the tile size, centre crop: CLIPImageProcessor). A Family pairs a tower with a
language model; another encoder is another module like this one (llava_next.py extends it)."""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as Q
from gguf import MODEL_TENSOR as MT
from gguf import TENSOR_NAMES
from gguf import GGUFValueType as T
from gguf import Keys

from ..errors import ConfigError
from ..quant_types import tensor_bytes
from .fields import MAX_HEADS, MAX_IMAGE, MAX_LAYERS, MAX_WIDTH, Fields
from .hparams import VisionHParams
from .spec import Ignored, MetadataEntry, TensorSpec, expand


def tn(tensor: MT, suffix: str = "") -> str:
    """llama.cpp's name for a tensor kind (with '{bid}' for the block), from gguf-py."""
    return TENSOR_NAMES[tensor] + suffix


# Source-name prefixes of the vision half → canonical prefixes (the family puts the language model's first).
REPLACEMENTS = (
    ("model.vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),  # transformers 5, in-memory names
    ("vision_tower.vision_model.", "vision."),  # transformers 4 hub checkpoints
    ("vision_tower.", "vision."),  # transformers 5 save_pretrained
    ("model.multi_modal_projector.", "projector."),  # transformers 5, in-memory names
    ("multi_modal_projector.", "projector."),  # transformers 4 and 5 files
)

# (canonical source name, GGUF name, shape in PyTorch order with hyper-parameter names)
VISION = (
    ("vision.embeddings.class_embedding", tn(MT.V_ENC_EMBD_CLS), ("v_embd",)),
    ("vision.embeddings.patch_embedding.weight", tn(MT.V_ENC_EMBD_PATCH, ".weight"), ("v_embd", 3, "v_patch", "v_patch")),
    ("vision.embeddings.position_embedding.weight", tn(MT.V_ENC_EMBD_POS, ".weight"), ("v_n_pos", "v_embd")),
    ("vision.pre_layrnorm.weight", tn(MT.V_PRE_NORM, ".weight"), ("v_embd",)),
    ("vision.pre_layrnorm.bias", tn(MT.V_PRE_NORM, ".bias"), ("v_embd",)),
    ("projector.linear_1.weight", tn(MT.V_MMPROJ, ".weight").format(bid=0), ("n_embd", "v_embd")),
    ("projector.linear_1.bias", tn(MT.V_MMPROJ, ".bias").format(bid=0), ("n_embd",)),
    ("projector.linear_2.weight", tn(MT.V_MMPROJ, ".weight").format(bid=2), ("n_embd", "n_embd")),
    ("projector.linear_2.bias", tn(MT.V_MMPROJ, ".bias").format(bid=2), ("n_embd",)),
)
_V = "vision.encoder.layers.{bid}."
VISION_BLOCK = tuple(
    (_V + source + suffix, tn(kind, suffix), shape if suffix == ".weight" else shape[:1])
    for source, kind, shape in (
        ("layer_norm1", MT.V_ENC_INPUT_NORM, ("v_embd",)),
        ("self_attn.q_proj", MT.V_ENC_ATTN_Q, ("v_embd", "v_embd")),
        ("self_attn.k_proj", MT.V_ENC_ATTN_K, ("v_embd", "v_embd")),
        ("self_attn.v_proj", MT.V_ENC_ATTN_V, ("v_embd", "v_embd")),
        ("self_attn.out_proj", MT.V_ENC_ATTN_O, ("v_embd", "v_embd")),
        ("layer_norm2", MT.V_ENC_POST_ATTN_NORM, ("v_embd",)),
        ("mlp.fc1", MT.V_ENC_FFN_UP, ("v_ff", "v_embd")),
        ("mlp.fc2", MT.V_ENC_FFN_DOWN, ("v_embd", "v_ff")),
    ) for suffix in (".weight", ".bias"))
ALWAYS_IGNORED = (
    Ignored("vision.embeddings.position_ids", "a buffer of position indices, not a weight"),
    Ignored("vision.post_layernorm.weight", "llava reads encoder hidden states, before the post-layernorm"),
    Ignored("vision.post_layernorm.bias", "llava reads encoder hidden states, before the post-layernorm"),
)

# CLIP activation names → the mmproj flag llama.cpp reads (absent flag = quick GELU).
VISION_ACTIVATIONS = {"quick_gelu": None, "gelu": Keys.ClipVision.USE_GELU, "gelu_new": Keys.ClipVision.USE_GELU,
                      "gelu_pytorch_tanh": Keys.ClipVision.USE_GELU, "silu": Keys.ClipVision.USE_SILU}
PROJECTOR_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh")  # llama.cpp's mlp projector: GELU only
# CLIPVisionConfig's defaults (transformers), for vision_config fields a hub config leaves out.
CLIP_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                        "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                        "layer_norm_eps": 1e-5}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PIL_BICUBIC = 3
RESIZE_KEY, RESAMPLE_KEY = "acestep_gguf.image.resize_shortest_edge", "acestep_gguf.image.resample"
PINPOINTS_KEY = "clip.vision.image_grid_pinpoints"

# The keys llama.cpp 0.3.36 reads from an mmproj and the GGUF type it demands: clip.cpp's getters
# abort the whole process (GGML_ASSERT) on a type mismatch, so the runtime checks these before
# loading. key -> (type, element type, required, (low, high) for numbers or array lengths).
S, U32, I32, F32, BOOL, ARR = T.STRING, T.UINT32, T.INT32, T.FLOAT32, T.BOOL, T.ARRAY
V, A = Keys.ClipVision, Keys.ClipVision.Attention
VISION_KEYS = {
    Keys.General.ARCHITECTURE: (S, None, True, None),
    Keys.Clip.PROJECTOR_TYPE: (S, None, True, None),
    Keys.Clip.HAS_VISION_ENCODER: (BOOL, None, True, None),
    Keys.Clip.HAS_AUDIO_ENCODER: (BOOL, None, False, None),
    V.IMAGE_SIZE: (U32, None, True, (1, MAX_IMAGE)),
    V.PATCH_SIZE: (U32, None, True, (1, MAX_IMAGE)),
    V.EMBEDDING_LENGTH: (U32, None, True, (1, MAX_WIDTH)),
    V.FEED_FORWARD_LENGTH: (U32, None, True, (1, MAX_WIDTH)),
    V.PROJECTION_DIM: (U32, None, True, (1, MAX_WIDTH)),
    V.BLOCK_COUNT: (U32, None, True, (1, MAX_LAYERS)),
    A.HEAD_COUNT: (U32, None, True, (1, MAX_HEADS)),
    A.HEAD_COUNT + "_kv": (U32, None, False, (1, MAX_HEADS)),
    A.LAYERNORM_EPS: (F32, None, True, (0.0, 1.0)),
    "clip.vision.feature_layer": (ARR, I32, False, None),
    V.IMAGE_MEAN: (ARR, F32, True, (3, 3)),
    V.IMAGE_STD: (ARR, F32, True, (3, 3)),
    PINPOINTS_KEY: (ARR, I32, False, None),
    V.USE_GELU: (BOOL, None, False, None),
    V.USE_SILU: (BOOL, None, False, None),
    "clip.vision.mm_patch_merge_type": (S, None, False, None),
    RESIZE_KEY: (U32, None, False, (1, MAX_IMAGE)),
    RESAMPLE_KEY: (U32, None, False, (0, 5)),
}


@dataclass(frozen=True)
class ClipHParams(VisionHParams):
    resize_shortest_edge: int = 0  # CLIPImageProcessor's size before the centre crop


class ClipTower:
    """CLIP ViT + llava's MLP projector, one square picture of ``image_size`` (llava-1.5, ACE-Step 1.5)."""

    name = "clip"
    model_types = ("clip_vision_model",)
    projector_type = "mlp"
    replacements = REPLACEMENTS
    cls_positions = 1  # CLIP puts one [CLS] position before the patches

    # -- what the tower is in a checkpoint -------------------------------------------------------
    def hparams(self, vision: Fields, top: Fields, preprocessor: Fields, tokenizer: dict | None = None,
                n_embd: int = 0) -> ClipHParams:
        """The tower's hyper-parameters, validated (``n_embd``: the language model's width, the projector's output)."""
        vision = Fields({**CLIP_VISION_DEFAULTS, **vision.data}, vision.where)
        shape = _vision_hparams(vision, top)
        return ClipHParams(n_embd=n_embd, **shape, v_n_pos=self.n_tile_positions(shape["v_image"], shape["v_patch"]),
                           **_image_preprocessing(preprocessor, shape["v_image"]))

    def tensors(self, h: ClipHParams) -> list[TensorSpec]:
        return expand(VISION, h, "vision") + expand(VISION_BLOCK, h, "vision", h.v_feature_layer)

    def ignored(self, h: ClipHParams) -> list[Ignored]:
        return list(ALWAYS_IGNORED) + [
            Ignored(source.format(bid=bid), "after vision_feature_layer: llava never computes this layer")
            for bid in range(h.v_feature_layer, h.v_n_layer) for source, _, _ in VISION_BLOCK]

    def metadata(self, h: ClipHParams) -> list[MetadataEntry]:
        """clip.* keys of the mmproj GGUF, plus the pixel recipe the runtime applies before llama.cpp."""
        entries = tower_metadata(self.projector_type, h) + [
            # llama.cpp otherwise skips the last written layer; this makes it run all of them.
            MetadataEntry("clip.vision.feature_layer", [h.v_feature_layer], T.ARRAY, T.INT32),
            MetadataEntry(V.IMAGE_MEAN, list(h.image_mean), T.ARRAY, T.FLOAT32),
            MetadataEntry(V.IMAGE_STD, list(h.image_std), T.ARRAY, T.FLOAT32),
            MetadataEntry(RESIZE_KEY, h.resize_shortest_edge, T.UINT32),
            MetadataEntry(RESAMPLE_KEY, h.resample, T.UINT32),
        ]
        flag = VISION_ACTIVATIONS[h.v_act]
        if flag:
            entries.append(MetadataEntry(flag, True, T.BOOL))
        return entries

    # -- positions a picture takes ---------------------------------------------------------------
    def n_tile_positions(self, image_size: int, patch_size: int) -> int:
        """Positions inside the encoder for one tile: the patches and the [CLS] token."""
        return (image_size // patch_size) ** 2 + self.cls_positions

    def max_image_tokens(self, h: ClipHParams) -> int:
        """The most language-model positions one picture can take (the context check, the planner)."""
        return (h.v_image // h.v_patch) ** 2

    def mmproj_bytes(self, h: ClipHParams, matrix_type) -> int:
        """A model card's mmproj size: matrices in ``matrix_type`` (F16 or Q8_0), patch/position
        embeddings F16, vectors F32."""
        v, ff, e = h.v_embd, h.v_ff, h.n_embd
        per_layer = tensor_bytes(matrix_type, 4 * v * v + 2 * v * ff) + 4 * (4 * v + ff + 5 * v)
        fixed = tensor_bytes(Q.F16, v * 3 * h.v_patch ** 2 + h.v_n_pos * v) + 4 * 3 * v
        projector = tensor_bytes(matrix_type, v * e + e * e) + 4 * 2 * e
        return h.v_feature_layer * per_layer + fixed + projector

    def pixel_strategy(self, h: ClipHParams) -> dict:
        """How the runtime shapes pictures beyond the square crop (runtime/images.py's PixelRecipe fields)."""
        return {}

    # -- reading an mmproj back (the runtime's checks) -------------------------------------------
    keys = VISION_KEYS

    def reads(self, fields: dict) -> bool:
        """This tower's mmproj: llava's projector, one square tile (no grid pinpoints)."""
        return fields.get(Keys.Clip.PROJECTOR_TYPE) == self.projector_type and PINPOINTS_KEY not in fields

    def gguf_hparams(self, fields: dict) -> ClipHParams:
        """The hyper-parameters ``tensors`` needs, read back from a checked mmproj."""
        shape = tower_gguf_hparams(fields)
        return ClipHParams(**shape, v_n_pos=self.n_tile_positions(shape["v_image"], shape["v_patch"]))

    def gguf_problems(self, h: ClipHParams, fields: dict) -> list[str]:
        """Relations between an mmproj's keys that llama.cpp assumes without checking."""
        bad = any(not 0 <= k <= h.v_feature_layer for k in fields.get("clip.vision.feature_layer", []))
        return tower_problems(h, fields) + (["clip.vision.feature_layer is outside the written layers"] if bad else [])


def tower_problems(h: VisionHParams, fields: dict) -> list[str]:
    """What llama.cpp assumes of every tower's mmproj without checking."""
    checks = [
        (h.v_image % h.v_patch or h.v_patch > h.v_image, "clip.vision.image_size is not a multiple of patch_size"),
        (h.v_embd % h.v_head, "clip.vision.embedding_length is not a multiple of attention.head_count"),
        (fields.get(Keys.Clip.HAS_VISION_ENCODER) is not True, "clip.has_vision_encoder is not true"),
        (fields.get(V.USE_GELU) and fields.get(V.USE_SILU), "clip.use_gelu and clip.use_silu are both set"),
    ]
    return [message for bad, message in checks if bad]


def feature_layer(top: Fields, n_layer: int) -> int:
    """``vision_feature_layer`` (LlavaConfig's default -2) as the number of encoder layers it reads:
    hidden_states[k] is the output of k layers; negative indices count from the end."""
    layer = top.data.get("vision_feature_layer", -2)
    if type(layer) is not int:
        raise ConfigError(f"config.json: vision_feature_layer {layer!r}: only a single layer index is supported")
    k = layer if layer >= 0 else n_layer + 1 + layer
    if not 1 <= k <= n_layer:
        raise ConfigError(f"config.json: vision_feature_layer {layer} is out of range for {n_layer} layers")
    return k


def check_projector(top: Fields) -> None:
    """llava's two-layer projector as llama.cpp builds it for every tower: GELU, with biases."""
    act = top.string("projector_hidden_act", "gelu")
    if act not in PROJECTOR_ACTIVATIONS:
        raise ConfigError(f"config.json: projector_hidden_act {act!r} is not supported: llama.cpp's projector uses GELU")
    if top.boolean("multimodal_projector_bias", True) is False:
        raise ConfigError("config.json: multimodal_projector_bias false is not supported: llama.cpp needs projector biases")


def tower_metadata(projector_type: str, h: VisionHParams) -> list[MetadataEntry]:
    """The clip.* keys every tower writes: its projector, shape and norm epsilon (``v_eps``)."""
    return [
        MetadataEntry(Keys.Clip.PROJECTOR_TYPE, projector_type, T.STRING),
        MetadataEntry(Keys.Clip.HAS_VISION_ENCODER, True, T.BOOL),
        MetadataEntry("clip.has_text_encoder", False, T.BOOL),
        MetadataEntry(V.IMAGE_SIZE, h.v_image, T.UINT32),
        MetadataEntry(V.PATCH_SIZE, h.v_patch, T.UINT32),
        MetadataEntry(V.EMBEDDING_LENGTH, h.v_embd, T.UINT32),
        MetadataEntry(V.FEED_FORWARD_LENGTH, h.v_ff, T.UINT32),
        MetadataEntry(V.PROJECTION_DIM, h.n_embd, T.UINT32),
        MetadataEntry(V.BLOCK_COUNT, h.v_feature_layer, T.UINT32),
        MetadataEntry(A.HEAD_COUNT, h.v_head, T.UINT32),
        MetadataEntry(A.LAYERNORM_EPS, h.v_eps, T.FLOAT32),
    ]


def tower_gguf_hparams(fields: dict) -> dict:
    """What every tower's tensor table needs, read back from a checked mmproj (VisionHParams' fields)."""
    return {"n_embd": fields[V.PROJECTION_DIM], "v_embd": fields[V.EMBEDDING_LENGTH],
            "v_ff": fields[V.FEED_FORWARD_LENGTH], "v_head": fields[A.HEAD_COUNT],
            "v_image": fields[V.IMAGE_SIZE], "v_patch": fields[V.PATCH_SIZE], "v_feature_layer": fields[V.BLOCK_COUNT]}


def _vision_hparams(vision: Fields, top: Fields) -> dict:
    """The tower's shape from vision_config and the llava config around it (VisionHParams' fields)."""
    v_embd, v_head = vision.integer("hidden_size", 1, MAX_WIDTH), vision.integer("num_attention_heads", 1, MAX_HEADS)
    v_n_layer = vision.integer("num_hidden_layers", 1, MAX_LAYERS)
    v_image, v_patch = vision.integer("image_size", 1, MAX_IMAGE), vision.integer("patch_size", 1, MAX_IMAGE)
    v_ff = vision.integer("intermediate_size", 1, MAX_WIDTH)
    if vision.integer("num_channels", 1, 4, 3) != 3:
        raise ConfigError("config.json: vision_config.num_channels must be 3 (RGB)")
    if v_embd % v_head:
        raise ConfigError("config.json: vision_config.hidden_size is not a multiple of num_attention_heads")
    v_eps = vision.number("layer_norm_eps", 0.0, 1.0, 1e-5)
    v_act = vision.string("hidden_act", "quick_gelu")
    if v_act not in VISION_ACTIVATIONS:
        raise ConfigError(f"config.json: vision_config.hidden_act {v_act!r} is not supported by llama.cpp's CLIP")
    if v_image % v_patch:
        raise ConfigError("config.json: vision_config.image_size is not a multiple of patch_size")
    k = feature_layer(top, v_n_layer)
    strategy = top.string("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ConfigError(f"config.json: vision_feature_select_strategy {strategy!r} is not supported: llama.cpp's "
                          "mlp projector drops the CLS token ('default')")
    check_projector(top)
    return dict(v_embd=v_embd, v_ff=v_ff, v_head=v_head, v_image=v_image, v_patch=v_patch, v_feature_layer=k,
                v_n_layer=v_n_layer, v_eps=v_eps, v_act=v_act)


def _image_preprocessing(pre: Fields, image_size: int) -> dict:
    """Mean/std and the resize + centre-crop recipe of CLIPImageProcessor (CLIP defaults when absent)."""
    size = pre.data.get("size", {"shortest_edge": image_size})
    if isinstance(size, dict):
        sizes = pre.section("size", size)
        shortest = sizes.integer("shortest_edge", 1, MAX_IMAGE, None) if "shortest_edge" in size else min(
            sizes.integer("height", 1, MAX_IMAGE, image_size), sizes.integer("width", 1, MAX_IMAGE, image_size))
    else:
        shortest = pre.integer("size", 1, MAX_IMAGE)
    crop = pre.section("crop_size").integer("height", 1, MAX_IMAGE, image_size) \
        if isinstance(pre.data.get("crop_size"), dict) else pre.integer("crop_size", 1, MAX_IMAGE, image_size)
    if not pre.boolean("do_center_crop", True):
        crop = image_size
    if crop != image_size:
        raise ConfigError(f"preprocessor_config.json: crop_size {crop} differs from vision_config.image_size {image_size}")
    if shortest < image_size:
        raise ConfigError(f"preprocessor_config.json: size {shortest} is smaller than the {image_size}-pixel crop")
    return {"image_mean": tuple(pre.numbers("image_mean", 3, CLIP_MEAN)),
            "image_std": tuple(pre.numbers("image_std", 3, CLIP_STD)),
            "resize_shortest_edge": shortest, "resample": pre.integer("resample", 0, 5, PIL_BICUBIC)}


CLIP = ClipTower()
