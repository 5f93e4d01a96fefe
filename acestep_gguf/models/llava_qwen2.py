"""ACE-Step 1.5's family: Hugging Face ``LlavaForConditionalGeneration`` with a Qwen2 language
model, a CLIP vision tower and a two-layer GELU MLP projector.

Everything the converter knows about this layout is here as data: the name rewrites that fold the
three tensor-name styles into one, the tensor tables, the hyper-parameters and the GGUF metadata.
"""

from __future__ import annotations

from gguf import GGUFValueType as T

from ..errors import ConfigError
from .spec import Ignored, MetadataEntry, TensorSpec, expand

FAMILY = "llava_qwen2"
ARCHITECTURES = ("LlavaForConditionalGeneration",)
TEXT_MODEL_TYPES = ("qwen2",)
VISION_MODEL_TYPES = ("clip_vision_model",)

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

LANGUAGE = (
    ("text.embed_tokens.weight", "token_embd.weight", ("n_vocab", "n_embd")),
    ("text.norm.weight", "output_norm.weight", ("n_embd",)),
)
LANGUAGE_HEAD = (("lm_head.weight", "output.weight", ("n_vocab", "n_embd")),)
LANGUAGE_BLOCK = (
    ("text.layers.{bid}.input_layernorm.weight", "blk.{bid}.attn_norm.weight", ("n_embd",)),
    ("text.layers.{bid}.self_attn.q_proj.weight", "blk.{bid}.attn_q.weight", ("n_q", "n_embd")),
    ("text.layers.{bid}.self_attn.q_proj.bias", "blk.{bid}.attn_q.bias", ("n_q",)),
    ("text.layers.{bid}.self_attn.k_proj.weight", "blk.{bid}.attn_k.weight", ("n_kv", "n_embd")),
    ("text.layers.{bid}.self_attn.k_proj.bias", "blk.{bid}.attn_k.bias", ("n_kv",)),
    ("text.layers.{bid}.self_attn.v_proj.weight", "blk.{bid}.attn_v.weight", ("n_kv", "n_embd")),
    ("text.layers.{bid}.self_attn.v_proj.bias", "blk.{bid}.attn_v.bias", ("n_kv",)),
    ("text.layers.{bid}.self_attn.o_proj.weight", "blk.{bid}.attn_output.weight", ("n_embd", "n_q")),
    ("text.layers.{bid}.post_attention_layernorm.weight", "blk.{bid}.ffn_norm.weight", ("n_embd",)),
    ("text.layers.{bid}.mlp.gate_proj.weight", "blk.{bid}.ffn_gate.weight", ("n_ff", "n_embd")),
    ("text.layers.{bid}.mlp.up_proj.weight", "blk.{bid}.ffn_up.weight", ("n_ff", "n_embd")),
    ("text.layers.{bid}.mlp.down_proj.weight", "blk.{bid}.ffn_down.weight", ("n_embd", "n_ff")),
)
VISION = (
    ("vision.embeddings.class_embedding", "v.class_embd", ("v_embd",)),
    ("vision.embeddings.patch_embedding.weight", "v.patch_embd.weight", ("v_embd", 3, "v_patch", "v_patch")),
    ("vision.embeddings.position_embedding.weight", "v.position_embd.weight", ("v_n_pos", "v_embd")),
    ("vision.pre_layrnorm.weight", "v.pre_ln.weight", ("v_embd",)),
    ("vision.pre_layrnorm.bias", "v.pre_ln.bias", ("v_embd",)),
    ("projector.linear_1.weight", "mm.0.weight", ("n_embd", "v_embd")),
    ("projector.linear_1.bias", "mm.0.bias", ("n_embd",)),
    ("projector.linear_2.weight", "mm.2.weight", ("n_embd", "n_embd")),
    ("projector.linear_2.bias", "mm.2.bias", ("n_embd",)),
)
VISION_BLOCK = (
    ("vision.encoder.layers.{bid}.layer_norm1.weight", "v.blk.{bid}.ln1.weight", ("v_embd",)),
    ("vision.encoder.layers.{bid}.layer_norm1.bias", "v.blk.{bid}.ln1.bias", ("v_embd",)),
    ("vision.encoder.layers.{bid}.self_attn.q_proj.weight", "v.blk.{bid}.attn_q.weight", ("v_embd", "v_embd")),
    ("vision.encoder.layers.{bid}.self_attn.q_proj.bias", "v.blk.{bid}.attn_q.bias", ("v_embd",)),
    ("vision.encoder.layers.{bid}.self_attn.k_proj.weight", "v.blk.{bid}.attn_k.weight", ("v_embd", "v_embd")),
    ("vision.encoder.layers.{bid}.self_attn.k_proj.bias", "v.blk.{bid}.attn_k.bias", ("v_embd",)),
    ("vision.encoder.layers.{bid}.self_attn.v_proj.weight", "v.blk.{bid}.attn_v.weight", ("v_embd", "v_embd")),
    ("vision.encoder.layers.{bid}.self_attn.v_proj.bias", "v.blk.{bid}.attn_v.bias", ("v_embd",)),
    ("vision.encoder.layers.{bid}.self_attn.out_proj.weight", "v.blk.{bid}.attn_out.weight", ("v_embd", "v_embd")),
    ("vision.encoder.layers.{bid}.self_attn.out_proj.bias", "v.blk.{bid}.attn_out.bias", ("v_embd",)),
    ("vision.encoder.layers.{bid}.layer_norm2.weight", "v.blk.{bid}.ln2.weight", ("v_embd",)),
    ("vision.encoder.layers.{bid}.layer_norm2.bias", "v.blk.{bid}.ln2.bias", ("v_embd",)),
    ("vision.encoder.layers.{bid}.mlp.fc1.weight", "v.blk.{bid}.ffn_up.weight", ("v_ff", "v_embd")),
    ("vision.encoder.layers.{bid}.mlp.fc1.bias", "v.blk.{bid}.ffn_up.bias", ("v_ff",)),
    ("vision.encoder.layers.{bid}.mlp.fc2.weight", "v.blk.{bid}.ffn_down.weight", ("v_embd", "v_ff")),
    ("vision.encoder.layers.{bid}.mlp.fc2.bias", "v.blk.{bid}.ffn_down.bias", ("v_embd",)),
)
ALWAYS_IGNORED = (
    Ignored("vision.embeddings.position_ids", "a buffer of position indices, not a weight"),
    Ignored("vision.post_layernorm.weight", "llava reads encoder hidden states, before the post-layernorm"),
    Ignored("vision.post_layernorm.bias", "llava reads encoder hidden states, before the post-layernorm"),
    Ignored("text.rotary_emb.inv_freq", "llama.cpp recomputes rotary frequencies"),
)

# CLIP activation names → the mmproj flag llama.cpp reads (absent flag = quick GELU).
VISION_ACTIVATIONS = {"quick_gelu": None, "gelu": "clip.use_gelu", "gelu_new": "clip.use_gelu",
                      "gelu_pytorch_tanh": "clip.use_gelu", "silu": "clip.use_silu"}
# llama.cpp's mlp projector always applies GELU between its two layers.
PROJECTOR_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh")

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PIL_BICUBIC = 3

# Used when the checkpoint's own template cannot render a message whose content is a list of
# parts. Images become the multimodal marker exactly where they appear; no system prompt added.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ('image', 'image_url', 'input_image') %}{{ '<__media__>' }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _field(cfg: dict, where: str, key: str, default=None):
    value = cfg.get(key, default)
    if value is None:
        raise ConfigError(f"config.json: {where}.{key} is missing")
    return value


def _rope(text: dict) -> tuple[float, dict | None]:
    """rope_theta and rope_scaling from either transformers-4 or transformers-5 (rope_parameters) keys."""
    params = text.get("rope_parameters") or {}
    theta = text.get("rope_theta", params.get("rope_theta", 1_000_000.0))
    scaling = text.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            return float(theta), None
        if kind not in ("yarn", "linear"):
            raise ConfigError(f"config.json: text_config.rope_scaling type {kind!r} is not supported (yarn, linear)")
        if "factor" not in scaling:
            raise ConfigError("config.json: text_config.rope_scaling.factor is missing")
        scaling = {"type": kind, **scaling}
    return float(theta), scaling


def hparams(config: dict, preprocessor: dict) -> dict:
    """The hyper-parameters both GGUF files need, validated, in the converter's own names."""
    text = config.get("text_config") or {}
    vision = config.get("vision_config") or {}
    if text.get("model_type") not in TEXT_MODEL_TYPES:
        raise ConfigError(f"config.json: text_config.model_type is {text.get('model_type')!r}; only 'qwen2' is supported")
    if vision.get("model_type") not in VISION_MODEL_TYPES:
        raise ConfigError(
            f"config.json: vision_config.model_type is {vision.get('model_type')!r}; only 'clip_vision_model' is supported"
        )
    h: dict = {}
    for name, key in (("n_embd", "hidden_size"), ("n_ff", "intermediate_size"), ("n_layer", "num_hidden_layers"),
                      ("n_head", "num_attention_heads"), ("n_vocab", "vocab_size")):
        h[name] = int(_field(text, "text_config", key))
    h["n_head_kv"] = int(text.get("num_key_value_heads") or h["n_head"])
    h["head_dim"] = int(text.get("head_dim") or h["n_embd"] // h["n_head"])
    h["n_q"], h["n_kv"] = h["n_head"] * h["head_dim"], h["n_head_kv"] * h["head_dim"]
    h["rms_eps"] = float(text.get("rms_norm_eps", 1e-6))
    h["max_pos"] = int(_field(text, "text_config", "max_position_embeddings"))
    h["rope_theta"], h["rope_scaling"] = _rope(text)
    tie = text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
    h["tie_word_embeddings"] = bool(tie)

    for name, key in (("v_embd", "hidden_size"), ("v_ff", "intermediate_size"), ("v_n_layer", "num_hidden_layers"),
                      ("v_head", "num_attention_heads"), ("v_image", "image_size"), ("v_patch", "patch_size")):
        h[name] = int(_field(vision, "vision_config", key))
    if int(vision.get("num_channels", 3)) != 3:
        raise ConfigError("config.json: vision_config.num_channels must be 3 (RGB)")
    h["v_eps"] = float(vision.get("layer_norm_eps", 1e-5))
    h["v_act"] = vision.get("hidden_act", "quick_gelu")
    if h["v_act"] not in VISION_ACTIVATIONS:
        raise ConfigError(f"config.json: vision_config.hidden_act {h['v_act']!r} is not supported by llama.cpp's CLIP")
    if h["v_image"] % h["v_patch"]:
        raise ConfigError("config.json: vision_config.image_size is not a multiple of patch_size")
    h["v_n_patches"] = (h["v_image"] // h["v_patch"]) ** 2
    h["v_n_pos"] = h["v_n_patches"] + 1

    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ConfigError(f"config.json: vision_feature_layer {layer!r}: only a single layer index is supported")
    # hidden_states[k] is the output of k encoder layers; negative indices count from the end.
    k = layer if layer >= 0 else h["v_n_layer"] + 1 + layer
    if not 1 <= k <= h["v_n_layer"]:
        raise ConfigError(f"config.json: vision_feature_layer {layer} is out of range for {h['v_n_layer']} layers")
    h["v_feature_layer"] = k
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ConfigError(
            f"config.json: vision_feature_select_strategy {strategy!r} is not supported: llama.cpp's mlp projector "
            "drops the CLS token ('default')"
        )
    act = config.get("projector_hidden_act", "gelu")
    if act not in PROJECTOR_ACTIVATIONS:
        raise ConfigError(f"config.json: projector_hidden_act {act!r} is not supported: llama.cpp's mlp projector uses GELU")
    if config.get("multimodal_projector_bias", True) is False:
        raise ConfigError("config.json: multimodal_projector_bias false is not supported: llama.cpp needs projector biases")
    h["image_token_id"] = config.get("image_token_index", config.get("image_token_id"))
    h.update(_image_preprocessing(preprocessor, h["v_image"]))
    return h


def _image_preprocessing(pre: dict, image_size: int) -> dict:
    """Mean/std and the resize + centre-crop recipe of CLIPImageProcessor (CLIP defaults when absent)."""
    size = pre.get("size", {"shortest_edge": image_size})
    shortest = size.get("shortest_edge") if isinstance(size, dict) else size
    if shortest is None and isinstance(size, dict):
        shortest = min(size.get("height", image_size), size.get("width", image_size))
    crop = pre.get("crop_size", image_size)
    crop = crop if isinstance(crop, int) else crop.get("height", image_size)
    if not pre.get("do_center_crop", True):
        crop = image_size
    if crop != image_size:
        raise ConfigError(
            f"preprocessor_config.json: crop_size {crop} differs from vision_config.image_size {image_size}"
        )
    mean, std = pre.get("image_mean", CLIP_MEAN), pre.get("image_std", CLIP_STD)
    for key, value in (("image_mean", mean), ("image_std", std)):
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(x, (int, float)) for x in value)):
            raise ConfigError(f"preprocessor_config.json: {key} must be a list of 3 numbers, got {value!r}")
    return {"image_mean": [float(x) for x in mean], "image_std": [float(x) for x in std],
            "resize_shortest_edge": int(shortest), "resample": int(pre.get("resample", PIL_BICUBIC))}


def tensors(h: dict) -> list[TensorSpec]:
    """Every tensor both outputs must contain, with the shape config.json implies."""
    specs = expand(LANGUAGE, h, "language") + expand(LANGUAGE_BLOCK, h, "language", h["n_layer"])
    if not h["tie_word_embeddings"]:
        specs += expand(LANGUAGE_HEAD, h, "language")
    return specs + expand(VISION, h, "vision") + expand(VISION_BLOCK, h, "vision", h["v_feature_layer"])


def ignored(h: dict) -> list[Ignored]:
    """Source tensors that exist in real checkpoints but are deliberately not converted."""
    skipped = [Ignored(source.format(bid=bid), "after vision_feature_layer: llava never computes this layer")
               for bid in range(h["v_feature_layer"], h["v_n_layer"]) for source, _, _ in VISION_BLOCK]
    if h["tie_word_embeddings"]:
        skipped.append(Ignored("lm_head.weight", "tie_word_embeddings: the output reuses token_embd"))
    skipped += [Ignored(f"text.layers.{i}.self_attn.rotary_emb.inv_freq", "llama.cpp recomputes rotary frequencies")
                for i in range(h["n_layer"])]
    return list(ALWAYS_IGNORED) + skipped


def context_length(h: dict) -> int:
    """The trained context: YaRN's factor × original length when scaled (Qwen2.5: 4 × 32768)."""
    scaling = h["rope_scaling"]
    if scaling and scaling["type"] == "yarn":
        original = int(scaling.get("original_max_position_embeddings", h["max_pos"]))
        return max(h["max_pos"], int(original * float(scaling["factor"])))
    return h["max_pos"]


def language_metadata(h: dict) -> list[MetadataEntry]:
    """qwen2.* keys of the language-model GGUF (tokenizer and template are added separately)."""
    a = "qwen2"
    entries = [
        MetadataEntry(f"{a}.context_length", context_length(h), T.UINT32),
        MetadataEntry(f"{a}.embedding_length", h["n_embd"], T.UINT32),
        MetadataEntry(f"{a}.block_count", h["n_layer"], T.UINT32),
        MetadataEntry(f"{a}.feed_forward_length", h["n_ff"], T.UINT32),
        MetadataEntry(f"{a}.attention.head_count", h["n_head"], T.UINT32),
        MetadataEntry(f"{a}.attention.head_count_kv", h["n_head_kv"], T.UINT32),
        MetadataEntry(f"{a}.attention.layer_norm_rms_epsilon", h["rms_eps"], T.FLOAT32),
        MetadataEntry(f"{a}.rope.freq_base", h["rope_theta"], T.FLOAT32),
    ]
    scaling = h["rope_scaling"]
    if scaling:
        entries += [
            MetadataEntry(f"{a}.rope.scaling.type", scaling["type"], T.STRING),
            MetadataEntry(f"{a}.rope.scaling.factor", float(scaling["factor"]), T.FLOAT32),
        ]
        if scaling["type"] == "yarn":
            original = int(scaling.get("original_max_position_embeddings", h["max_pos"]))
            entries.append(MetadataEntry(f"{a}.rope.scaling.original_context_length", original, T.UINT32))
    return entries


def vision_metadata(h: dict) -> list[MetadataEntry]:
    """clip.* keys of the mmproj GGUF, plus the pixel recipe the runtime applies before llama.cpp."""
    entries = [
        MetadataEntry("clip.projector_type", "mlp", T.STRING),
        MetadataEntry("clip.has_vision_encoder", True, T.BOOL),
        MetadataEntry("clip.has_text_encoder", False, T.BOOL),
        MetadataEntry("clip.vision.image_size", h["v_image"], T.UINT32),
        MetadataEntry("clip.vision.patch_size", h["v_patch"], T.UINT32),
        MetadataEntry("clip.vision.embedding_length", h["v_embd"], T.UINT32),
        MetadataEntry("clip.vision.feed_forward_length", h["v_ff"], T.UINT32),
        MetadataEntry("clip.vision.projection_dim", h["n_embd"], T.UINT32),
        MetadataEntry("clip.vision.block_count", h["v_feature_layer"], T.UINT32),
        MetadataEntry("clip.vision.attention.head_count", h["v_head"], T.UINT32),
        MetadataEntry("clip.vision.attention.layer_norm_epsilon", h["v_eps"], T.FLOAT32),
        # llama.cpp otherwise skips the last written layer; this makes it run all of them.
        MetadataEntry("clip.vision.feature_layer", [h["v_feature_layer"]], T.ARRAY, T.INT32),
        MetadataEntry("clip.vision.image_mean", h["image_mean"], T.ARRAY, T.FLOAT32),
        MetadataEntry("clip.vision.image_std", h["image_std"], T.ARRAY, T.FLOAT32),
        MetadataEntry("acestep_gguf.image.resize_shortest_edge", h["resize_shortest_edge"], T.UINT32),
        MetadataEntry("acestep_gguf.image.resample", h["resample"], T.UINT32),
    ]
    flag = VISION_ACTIVATIONS[h["v_act"]]
    if flag:
        entries.append(MetadataEntry(flag, True, T.BOOL))
    return entries
