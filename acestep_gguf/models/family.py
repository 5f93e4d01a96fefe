"""The Family type: one supported checkpoint layout as one typed object.

Every family today is a Hugging Face ``LlavaForConditionalGeneration``: a CLIP vision tower, a
two-layer MLP projector, and a language model. What they share (the vision half, the name rewrites,
the config layout) is here; what differs (llama.cpp's architecture, the tokenizer, q/k/v biases, the
built-in template) is a LanguageModel. A family module (llava_qwen2.py, llava_llama.py) is a few
rows of data; the pipeline, runtime and planner ask the Family and never name an architecture.
GGUF tensor names and metadata keys come from gguf-py's constants."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from gguf import MODEL_TENSOR as MT
from gguf import TENSOR_NAMES
from gguf import GGUFValueType as T
from gguf import Keys

from ..errors import ConfigError
from ..templates import PLACEHOLDER_KEY
from .fields import MAX_HEADS, MAX_IMAGE, MAX_LAYERS, MAX_POSITIONS, MAX_WIDTH, Fields
from .spec import Ignored, MetadataEntry, TensorSpec, expand
from .text_hparams import text_hparams
from .tokenizers import TOKENIZER_KEYS


def tn(tensor: MT, suffix: str = "") -> str:
    """llama.cpp's name for a tensor kind (with '{bid}' for the block), from gguf-py."""
    return TENSOR_NAMES[tensor] + suffix


# Source-name prefixes → canonical prefixes; the first match wins, so longer prefixes come first.
REPLACEMENTS = (
    ("model.language_model.", "text."),  # transformers 5, in-memory names
    ("language_model.model.", "text."),  # transformers 4 hub checkpoints
    ("language_model.lm_head.", "lm_head."),  # transformers 4 hub checkpoints
    ("lm_head.", "lm_head."),  # transformers 5
    ("model.vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),  # transformers 5, in-memory names
    ("vision_tower.vision_model.", "vision."),  # transformers 4 hub checkpoints
    ("vision_tower.", "vision."),  # transformers 5 save_pretrained
    ("model.multi_modal_projector.", "projector."),  # transformers 5, in-memory names
    ("multi_modal_projector.", "projector."),  # transformers 4 and 5 files
)

# (canonical source name, GGUF name, shape in PyTorch order with hyper-parameter names)
LANGUAGE = (
    ("text.embed_tokens.weight", tn(MT.TOKEN_EMBD, ".weight"), ("n_vocab", "n_embd")),
    ("text.norm.weight", tn(MT.OUTPUT_NORM, ".weight"), ("n_embd",)),
)
LANGUAGE_HEAD = (("lm_head.weight", tn(MT.OUTPUT, ".weight"), ("n_vocab", "n_embd")),)
DECODER_BLOCK = (  # a Llama-style decoder layer, as Llama, Mistral and Qwen2 store it
    ("text.layers.{bid}.input_layernorm.weight", tn(MT.ATTN_NORM, ".weight"), ("n_embd",)),
    ("text.layers.{bid}.self_attn.q_proj.weight", tn(MT.ATTN_Q, ".weight"), ("n_q", "n_embd")),
    ("text.layers.{bid}.self_attn.k_proj.weight", tn(MT.ATTN_K, ".weight"), ("n_kv", "n_embd")),
    ("text.layers.{bid}.self_attn.v_proj.weight", tn(MT.ATTN_V, ".weight"), ("n_kv", "n_embd")),
    ("text.layers.{bid}.self_attn.o_proj.weight", tn(MT.ATTN_OUT, ".weight"), ("n_embd", "n_q")),
    ("text.layers.{bid}.post_attention_layernorm.weight", tn(MT.FFN_NORM, ".weight"), ("n_embd",)),
    ("text.layers.{bid}.mlp.gate_proj.weight", tn(MT.FFN_GATE, ".weight"), ("n_ff", "n_embd")),
    ("text.layers.{bid}.mlp.up_proj.weight", tn(MT.FFN_UP, ".weight"), ("n_ff", "n_embd")),
    ("text.layers.{bid}.mlp.down_proj.weight", tn(MT.FFN_DOWN, ".weight"), ("n_embd", "n_ff")),
)
QKV_BIASES = (  # Qwen2's q/k/v projections have biases
    ("text.layers.{bid}.self_attn.q_proj.bias", tn(MT.ATTN_Q, ".bias"), ("n_q",)),
    ("text.layers.{bid}.self_attn.k_proj.bias", tn(MT.ATTN_K, ".bias"), ("n_kv",)),
    ("text.layers.{bid}.self_attn.v_proj.bias", tn(MT.ATTN_V, ".bias"), ("n_kv",)),
)
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
    Ignored("text.rotary_emb.inv_freq", "llama.cpp recomputes rotary frequencies"),
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
PROJECTOR_TYPE = "mlp"
RESIZE_KEY, RESAMPLE_KEY = "acestep_gguf.image.resize_shortest_edge", "acestep_gguf.image.resample"

# The keys llama.cpp 0.3.36 reads from each file and the GGUF type it demands: clip.cpp's getters
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
    "clip.vision.image_grid_pinpoints": (ARR, I32, False, None),
    V.USE_GELU: (BOOL, None, False, None),
    V.USE_SILU: (BOOL, None, False, None),
    "clip.vision.mm_patch_merge_type": (S, None, False, None),
    RESIZE_KEY: (U32, None, False, (1, MAX_IMAGE)),
    RESAMPLE_KEY: (U32, None, False, (0, 5)),
}


def _language_keys(arch: str) -> dict:
    keys = {
        Keys.LLM.CONTEXT_LENGTH: (U32, None, True, (1, MAX_POSITIONS * 64)),
        Keys.LLM.EMBEDDING_LENGTH: (U32, None, True, (1, MAX_WIDTH)),
        Keys.LLM.BLOCK_COUNT: (U32, None, True, (1, MAX_LAYERS)),
        Keys.LLM.FEED_FORWARD_LENGTH: (U32, None, True, (1, MAX_WIDTH)),
        Keys.Attention.HEAD_COUNT: (U32, None, True, (1, MAX_HEADS)),
        Keys.Attention.HEAD_COUNT_KV: (U32, None, False, (1, MAX_HEADS)),
        Keys.Attention.KEY_LENGTH: (U32, None, False, (1, MAX_WIDTH)),
        Keys.Attention.LAYERNORM_RMS_EPS: (F32, None, True, (0.0, 1.0)),
        Keys.Rope.FREQ_BASE: (F32, None, False, (1.0, 1e12)),
    }
    return {Keys.General.ARCHITECTURE: (S, None, True, None), Keys.Tokenizer.CHAT_TEMPLATE: (S, None, True, None),
            PLACEHOLDER_KEY: (S, None, False, None),
            **{k.format(arch=arch): rule for k, rule in keys.items()}}


@dataclass(frozen=True)
class LanguageModel:
    """The language-model half of a llava family: what llama.cpp calls it and how it is stored."""

    gguf_arch: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)
    model_types: tuple[str, ...]  # text_config.model_type values it covers
    tokenizer: str  # a kind in models/tokenizers.py
    qkv_bias: bool  # q/k/v projections carry biases
    builtin_template: str  # used when the checkpoint's own cannot render the runtime's conversations
    # transformers' config defaults per model_type: hub configs written by transformers 4 store only
    # what differs from them (llava-1.5-7b-hf's text_config has no hidden_size at all)
    config_defaults: dict
    # llama.cpp's `llama` architecture rotates adjacent pairs (GPT-J style) where transformers rotates
    # halves: the q/k projections are stored permuted and must be un-permuted (as llama.cpp's
    # convert_hf_to_gguf.py LlamaModel.permute does). Qwen2 uses NEOX rope in llama.cpp: no permutation.
    rope_permute: bool = False
    # llama.cpp's model loader calls some models LLM_TYPE_70B (its load_hparams, per architecture);
    # the _M quantization mixes then give attn_v one step more (convert/tensor_types.py)
    is_70b: Callable[[dict], bool] = lambda h: False  # noqa: E731


@dataclass(frozen=True)
class Family:
    """One supported checkpoint layout: how to recognise it, and everything the converter, runtime
    and planner need to know about it."""

    name: str
    architectures: tuple[str, ...]  # config.json "architectures"
    language: LanguageModel
    description: str  # for messages: "Qwen2 + CLIP + MLP projector"
    vision_model_types: tuple[str, ...] = ("clip_vision_model",)
    projector_type: str = PROJECTOR_TYPE
    vision_cls: bool = True  # CLIP puts one [CLS] position before the patches
    replacements: tuple = REPLACEMENTS

    @property
    def gguf_arch(self) -> str:
        return self.language.gguf_arch

    def matches(self, config: dict) -> bool:
        """True for a config.json of this family: architecture and both sub-model types."""
        text, vision = config.get("text_config"), config.get("vision_config")
        return (any(a in self.architectures for a in config.get("architectures") or [])
                and isinstance(text, dict) and text.get("model_type") in self.language.model_types
                and isinstance(vision, dict) and vision.get("model_type") in self.vision_model_types)

    def n_vision_positions(self, image_size: int, patch_size: int) -> int:
        return (image_size // patch_size) ** 2 + (1 if self.vision_cls else 0)

    # -- config.json -> hyper-parameters ------------------------------------------------------------
    def hparams(self, config: dict, preprocessor: dict) -> dict:
        """The hyper-parameters both GGUF files need, validated (types and bounds), in the converter's own names."""
        top = Fields(config, "config.json")
        text, vision = top.section("text_config"), top.section("vision_config")
        if text.data.get("model_type") not in self.language.model_types:
            raise ConfigError(f"config.json: text_config.model_type is {text.data.get('model_type')!r}; {self.name} "
                              f"takes {', '.join(self.language.model_types)}")
        if vision.data.get("model_type") not in self.vision_model_types:
            raise ConfigError(f"config.json: vision_config.model_type is {vision.data.get('model_type')!r}; only "
                              f"{', '.join(self.vision_model_types)} is supported")
        model_type = text.data["model_type"]
        vision = Fields({**CLIP_VISION_DEFAULTS, **vision.data}, vision.where)
        h = text_hparams(text, top, model_type, self.language.config_defaults[model_type])
        h.update(_vision_hparams(vision, top, self))
        h.update(_image_preprocessing(Fields(preprocessor, "preprocessor_config.json"), h["v_image"]))
        return h

    # -- tensors -----------------------------------------------------------------------------------
    def tensors(self, h: dict) -> list[TensorSpec]:
        """Every tensor both outputs must contain, with the shape config.json implies."""
        return self.role_tensors(h, "language") + self.role_tensors(h, "vision")

    def role_tensors(self, h: dict, role: str) -> list[TensorSpec]:
        """The tensors of one output file (language model or mmproj)."""
        if role == "vision":
            return expand(VISION, h, "vision") + expand(VISION_BLOCK, h, "vision", h["v_feature_layer"])
        block = DECODER_BLOCK + (QKV_BIASES if self.language.qkv_bias else ())
        specs = expand(LANGUAGE, h, "language") + expand(block, h, "language", h["n_layer"])
        specs += [] if h["tie_word_embeddings"] else expand(LANGUAGE_HEAD, h, "language")
        if not self.language.rope_permute:
            return specs
        heads = {tn(kind, ".weight").format(bid=i): n for i in range(h["n_layer"])
                 for kind, n in ((MT.ATTN_Q, h["n_head"]), (MT.ATTN_K, h["n_head_kv"]))}
        return [replace(s, rope_heads=heads.get(s.gguf_name, 0)) for s in specs]

    def ignored(self, h: dict) -> list[Ignored]:
        """Source tensors that exist in real checkpoints but are deliberately not converted."""
        skipped = [Ignored(source.format(bid=bid), "after vision_feature_layer: llava never computes this layer")
                   for bid in range(h["v_feature_layer"], h["v_n_layer"]) for source, _, _ in VISION_BLOCK]
        if h["tie_word_embeddings"]:
            skipped.append(Ignored("lm_head.weight", "tie_word_embeddings: the output reuses token_embd"))
        skipped += [Ignored(f"text.layers.{i}.self_attn.rotary_emb.inv_freq", "llama.cpp recomputes rotary frequencies")
                    for i in range(h["n_layer"])]
        return list(ALWAYS_IGNORED) + skipped

    # -- GGUF metadata -----------------------------------------------------------------------------
    def language_metadata(self, h: dict) -> list[MetadataEntry]:
        """<arch>.* keys of the language-model GGUF (tokenizer and template are added separately)."""
        a = self.gguf_arch
        entries = [
            MetadataEntry(Keys.LLM.CONTEXT_LENGTH.format(arch=a), context_length(h), T.UINT32),
            MetadataEntry(Keys.LLM.EMBEDDING_LENGTH.format(arch=a), h["n_embd"], T.UINT32),
            MetadataEntry(Keys.LLM.BLOCK_COUNT.format(arch=a), h["n_layer"], T.UINT32),
            MetadataEntry(Keys.LLM.FEED_FORWARD_LENGTH.format(arch=a), h["n_ff"], T.UINT32),
            MetadataEntry(Keys.Attention.HEAD_COUNT.format(arch=a), h["n_head"], T.UINT32),
            MetadataEntry(Keys.Attention.HEAD_COUNT_KV.format(arch=a), h["n_head_kv"], T.UINT32),
            MetadataEntry(Keys.Attention.LAYERNORM_RMS_EPS.format(arch=a), h["rms_eps"], T.FLOAT32),
            MetadataEntry(Keys.Rope.FREQ_BASE.format(arch=a), h["rope_theta"], T.FLOAT32),
        ]
        if h["head_dim"] * h["n_head"] != h["n_embd"]:
            entries.append(MetadataEntry(Keys.Attention.KEY_LENGTH.format(arch=a), h["head_dim"], T.UINT32))
            entries.append(MetadataEntry(Keys.Attention.VALUE_LENGTH.format(arch=a), h["head_dim"], T.UINT32))
        scaling = h["rope_scaling"]
        if scaling:
            entries += [MetadataEntry(Keys.Rope.SCALING_TYPE.format(arch=a), scaling["type"], T.STRING),
                        MetadataEntry(Keys.Rope.SCALING_FACTOR.format(arch=a), float(scaling["factor"]), T.FLOAT32)]
            if scaling["type"] == "yarn":
                original = int(scaling.get("original_max_position_embeddings", h["max_pos"]))
                entries.append(MetadataEntry(Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=a), original, T.UINT32))
        return entries

    def vision_metadata(self, h: dict) -> list[MetadataEntry]:
        """clip.* keys of the mmproj GGUF, plus the pixel recipe the runtime applies before llama.cpp."""
        entries = [
            MetadataEntry(Keys.Clip.PROJECTOR_TYPE, self.projector_type, T.STRING),
            MetadataEntry(Keys.Clip.HAS_VISION_ENCODER, True, T.BOOL),
            MetadataEntry("clip.has_text_encoder", False, T.BOOL),
            MetadataEntry(V.IMAGE_SIZE, h["v_image"], T.UINT32),
            MetadataEntry(V.PATCH_SIZE, h["v_patch"], T.UINT32),
            MetadataEntry(V.EMBEDDING_LENGTH, h["v_embd"], T.UINT32),
            MetadataEntry(V.FEED_FORWARD_LENGTH, h["v_ff"], T.UINT32),
            MetadataEntry(V.PROJECTION_DIM, h["n_embd"], T.UINT32),
            MetadataEntry(V.BLOCK_COUNT, h["v_feature_layer"], T.UINT32),
            MetadataEntry(A.HEAD_COUNT, h["v_head"], T.UINT32),
            MetadataEntry(A.LAYERNORM_EPS, h["v_eps"], T.FLOAT32),
            # llama.cpp otherwise skips the last written layer; this makes it run all of them.
            MetadataEntry("clip.vision.feature_layer", [h["v_feature_layer"]], T.ARRAY, T.INT32),
            MetadataEntry(V.IMAGE_MEAN, h["image_mean"], T.ARRAY, T.FLOAT32),
            MetadataEntry(V.IMAGE_STD, h["image_std"], T.ARRAY, T.FLOAT32),
            MetadataEntry(RESIZE_KEY, h["resize_shortest_edge"], T.UINT32),
            MetadataEntry(RESAMPLE_KEY, h["resample"], T.UINT32),
        ]
        flag = VISION_ACTIVATIONS[h["v_act"]]
        if flag:
            entries.append(MetadataEntry(flag, True, T.BOOL))
        return entries

    # -- reading a GGUF back (the runtime's checks) ------------------------------------------------
    def keys(self, role: str) -> dict:
        """The keys llama.cpp reads from one file, with the types it demands."""
        if role == "vision":
            return VISION_KEYS
        return {**_language_keys(self.gguf_arch), **TOKENIZER_KEYS[self.language.tokenizer]}

    def gguf_hparams(self, fields: dict, tensor_names, role: str) -> dict:
        """The hyper-parameters ``role_tensors`` needs, read back from one checked GGUF file."""
        if role == "vision":
            h = {"n_embd": fields[V.PROJECTION_DIM], "v_embd": fields[V.EMBEDDING_LENGTH],
                 "v_ff": fields[V.FEED_FORWARD_LENGTH], "v_head": fields[A.HEAD_COUNT],
                 "v_image": fields[V.IMAGE_SIZE], "v_patch": fields[V.PATCH_SIZE], "v_feature_layer": fields[V.BLOCK_COUNT]}
            h["v_n_pos"] = self.n_vision_positions(h["v_image"], h["v_patch"])
            return h
        a = self.gguf_arch
        tokens = fields[Keys.Tokenizer.LIST]
        h = {"n_embd": fields[Keys.LLM.EMBEDDING_LENGTH.format(arch=a)],
             "n_ff": fields[Keys.LLM.FEED_FORWARD_LENGTH.format(arch=a)],
             "n_layer": fields[Keys.LLM.BLOCK_COUNT.format(arch=a)],
             "n_head": fields[Keys.Attention.HEAD_COUNT.format(arch=a)],
             "n_vocab": len(tokens) if isinstance(tokens, list) else tokens.count,
             "tie_word_embeddings": tn(MT.OUTPUT, ".weight") not in tensor_names}
        h["n_head_kv"] = fields.get(Keys.Attention.HEAD_COUNT_KV.format(arch=a), h["n_head"])
        h["head_dim"] = fields.get(Keys.Attention.KEY_LENGTH.format(arch=a), h["n_embd"] // h["n_head"])
        h["n_q"], h["n_kv"] = h["n_head"] * h["head_dim"], h["n_head_kv"] * h["head_dim"]
        return h

    def gguf_problems(self, h: dict, fields: dict, role: str) -> list[str]:
        """Relations between hyper-parameters that llama.cpp assumes without checking."""
        if role == "language":
            checks = [(h["n_head"] % h["n_head_kv"], "attention.head_count is not a multiple of head_count_kv"),
                      (h["head_dim"] == 0, "embedding_length is smaller than attention.head_count")]
        else:
            checks = [
                (h["v_image"] % h["v_patch"] or h["v_patch"] > h["v_image"], "clip.vision.image_size is not a multiple of patch_size"),
                (h["v_embd"] % h["v_head"], "clip.vision.embedding_length is not a multiple of attention.head_count"),
                (fields.get(Keys.Clip.HAS_VISION_ENCODER) is not True, "clip.has_vision_encoder is not true"),
                (fields.get(V.USE_GELU) and fields.get(V.USE_SILU), "clip.use_gelu and clip.use_silu are both set"),
                (any(not 0 <= k <= h["v_feature_layer"] for k in fields.get("clip.vision.feature_layer", [])),
                 "clip.vision.feature_layer is outside the written layers"),
                (fields.get("clip.vision.image_grid_pinpoints"), "clip.vision.image_grid_pinpoints is not used by llava-1.5 models"),
            ]
        return [message for bad, message in checks if bad]


def context_length(h: dict) -> int:
    """The trained context: YaRN's factor × original length when scaled (Qwen2.5: 4 × 32768)."""
    scaling = h["rope_scaling"]
    if scaling and scaling["type"] == "yarn":
        original = int(scaling.get("original_max_position_embeddings", h["max_pos"]))
        return max(h["max_pos"], int(original * float(scaling["factor"])))
    return h["max_pos"]


def _vision_hparams(vision: Fields, top: Fields, family: Family) -> dict:
    h = dict(v_embd=vision.integer("hidden_size", 1, MAX_WIDTH), v_ff=vision.integer("intermediate_size", 1, MAX_WIDTH),
             v_n_layer=vision.integer("num_hidden_layers", 1, MAX_LAYERS),
             v_head=vision.integer("num_attention_heads", 1, MAX_HEADS),
             v_image=vision.integer("image_size", 1, MAX_IMAGE), v_patch=vision.integer("patch_size", 1, MAX_IMAGE))
    if vision.integer("num_channels", 1, 4, 3) != 3:
        raise ConfigError("config.json: vision_config.num_channels must be 3 (RGB)")
    if h["v_embd"] % h["v_head"]:
        raise ConfigError("config.json: vision_config.hidden_size is not a multiple of num_attention_heads")
    h["v_eps"] = vision.number("layer_norm_eps", 0.0, 1.0, 1e-5)
    h["v_act"] = vision.string("hidden_act", "quick_gelu")
    if h["v_act"] not in VISION_ACTIVATIONS:
        raise ConfigError(f"config.json: vision_config.hidden_act {h['v_act']!r} is not supported by llama.cpp's CLIP")
    if h["v_image"] % h["v_patch"]:
        raise ConfigError("config.json: vision_config.image_size is not a multiple of patch_size")
    h["v_n_patches"] = (h["v_image"] // h["v_patch"]) ** 2
    h["v_n_pos"] = family.n_vision_positions(h["v_image"], h["v_patch"])
    layer = top.data.get("vision_feature_layer", -2)
    if type(layer) is not int:
        raise ConfigError(f"config.json: vision_feature_layer {layer!r}: only a single layer index is supported")
    # hidden_states[k] is the output of k encoder layers; negative indices count from the end.
    k = layer if layer >= 0 else h["v_n_layer"] + 1 + layer
    if not 1 <= k <= h["v_n_layer"]:
        raise ConfigError(f"config.json: vision_feature_layer {layer} is out of range for {h['v_n_layer']} layers")
    h["v_feature_layer"] = k
    strategy = top.string("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ConfigError(f"config.json: vision_feature_select_strategy {strategy!r} is not supported: llama.cpp's "
                          "mlp projector drops the CLS token ('default')")
    act = top.string("projector_hidden_act", "gelu")
    if act not in PROJECTOR_ACTIVATIONS:
        raise ConfigError(f"config.json: projector_hidden_act {act!r} is not supported: llama.cpp's mlp projector uses GELU")
    if top.boolean("multimodal_projector_bias", True) is False:
        raise ConfigError("config.json: multimodal_projector_bias false is not supported: llama.cpp needs projector biases")
    return h


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
    return {"image_mean": pre.numbers("image_mean", 3, CLIP_MEAN), "image_std": pre.numbers("image_std", 3, CLIP_STD),
            "resize_shortest_edge": shortest, "resample": pre.integer("resample", 0, 5, PIL_BICUBIC)}
