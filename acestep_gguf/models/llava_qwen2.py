"""ACE-Step 1.5's family: Hugging Face ``LlavaForConditionalGeneration`` with a Qwen2 language
model, a CLIP vision tower and a two-layer GELU MLP projector.

Everything the converter knows about this layout is here as data: the name rewrites that fold the
three tensor-name styles into one, the tensor tables, the hyper-parameters and the GGUF metadata.
"""

from __future__ import annotations

from gguf import GGUFValueType as T

from ..errors import ConfigError
from .fields import MAX_IMAGE, MAX_HEADS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, Fields
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



def _rope(text: Fields) -> tuple[float, dict | None]:
    """rope_theta and rope_scaling from either transformers-4 or transformers-5 (rope_parameters) keys."""
    params = text.section("rope_parameters", None)
    theta = text.number("rope_theta", 1.0, 1e12, params.data.get("rope_theta", 1_000_000.0))
    scaling = text.data.get("rope_scaling")
    where = text.section("rope_scaling", None) if scaling is not None else params
    if scaling is None and params.data.get("rope_type", "default") == "default":
        return theta, None
    kind = where.string("rope_type", where.data.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("yarn", "linear"):
        raise ConfigError(f"{where.where} type {kind!r} is not supported (yarn, linear)")
    factor = where.number("factor", 1.0, 1024.0)
    out = {"type": kind, "factor": factor}
    if "original_max_position_embeddings" in where.data:
        out["original_max_position_embeddings"] = where.integer("original_max_position_embeddings", 1, MAX_POSITIONS)
    return theta, out


def hparams(config: dict, preprocessor: dict) -> dict:
    """The hyper-parameters both GGUF files need, validated (types and bounds), in the converter's own names."""
    top = Fields(config, "config.json")
    text, vision = top.section("text_config"), top.section("vision_config")
    if text.data.get("model_type") not in TEXT_MODEL_TYPES:
        raise ConfigError(f"config.json: text_config.model_type is {text.data.get('model_type')!r}; only 'qwen2' is supported")
    if vision.data.get("model_type") not in VISION_MODEL_TYPES:
        raise ConfigError(f"config.json: vision_config.model_type is {vision.data.get('model_type')!r}; only "
                          "'clip_vision_model' is supported")
    h: dict = {
        "n_embd": text.integer("hidden_size", 1, MAX_WIDTH), "n_ff": text.integer("intermediate_size", 1, MAX_WIDTH),
        "n_layer": text.integer("num_hidden_layers", 1, MAX_LAYERS),
        "n_head": text.integer("num_attention_heads", 1, MAX_HEADS), "n_vocab": text.integer("vocab_size", 1, MAX_VOCAB),
    }
    h["n_head_kv"] = text.integer("num_key_value_heads", 1, h["n_head"], h["n_head"])
    if h["n_head"] % h["n_head_kv"]:
        raise ConfigError("config.json: text_config.num_attention_heads is not a multiple of num_key_value_heads")
    h["head_dim"] = text.integer("head_dim", 1, MAX_WIDTH, h["n_embd"] // h["n_head"] or None)
    h["n_q"], h["n_kv"] = h["n_head"] * h["head_dim"], h["n_head_kv"] * h["head_dim"]
    h["rms_eps"] = text.number("rms_norm_eps", 0.0, 1.0, 1e-6)
    h["max_pos"] = text.integer("max_position_embeddings", 1, MAX_POSITIONS)
    h["rope_theta"], h["rope_scaling"] = _rope(text)
    h["tie_word_embeddings"] = text.boolean("tie_word_embeddings", top.boolean("tie_word_embeddings", False))

    h.update(v_embd=vision.integer("hidden_size", 1, MAX_WIDTH), v_ff=vision.integer("intermediate_size", 1, MAX_WIDTH),
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
    h["v_n_pos"] = h["v_n_patches"] + 1

    layer = config.get("vision_feature_layer", -2)
    if type(layer) is not int:
        raise ConfigError(f"config.json: vision_feature_layer {layer!r}: only a single layer index is supported")
    # hidden_states[k] is the output of k encoder layers; negative indices count from the end.
    k = layer if layer >= 0 else h["v_n_layer"] + 1 + layer
    if not 1 <= k <= h["v_n_layer"]:
        raise ConfigError(f"config.json: vision_feature_layer {layer} is out of range for {h['v_n_layer']} layers")
    h["v_feature_layer"] = k
    strategy = top.string("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ConfigError(
            f"config.json: vision_feature_select_strategy {strategy!r} is not supported: llama.cpp's mlp projector "
            "drops the CLS token ('default')"
        )
    act = top.string("projector_hidden_act", "gelu")
    if act not in PROJECTOR_ACTIVATIONS:
        raise ConfigError(f"config.json: projector_hidden_act {act!r} is not supported: llama.cpp's mlp projector uses GELU")
    if top.boolean("multimodal_projector_bias", True) is False:
        raise ConfigError("config.json: multimodal_projector_bias false is not supported: llama.cpp needs projector biases")
    h.update(_image_preprocessing(Fields(preprocessor, "preprocessor_config.json"), h["v_image"]))
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


def tensors(h: dict) -> list[TensorSpec]:
    """Every tensor both outputs must contain, with the shape config.json implies."""
    return role_tensors(h, "language") + role_tensors(h, "vision")


def role_tensors(h: dict, role: str) -> list[TensorSpec]:
    """The tensors of one output file (language model or mmproj)."""
    if role == "vision":
        return expand(VISION, h, "vision") + expand(VISION_BLOCK, h, "vision", h["v_feature_layer"])
    specs = expand(LANGUAGE, h, "language") + expand(LANGUAGE_BLOCK, h, "language", h["n_layer"])
    return specs + ([] if h["tie_word_embeddings"] else expand(LANGUAGE_HEAD, h, "language"))


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
        MetadataEntry("clip.projector_type", PROJECTOR_TYPE, T.STRING),
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


# -- what llama.cpp reads back ------------------------------------------------------------------
# The keys llama.cpp 0.3.36 reads from each file and the GGUF type it demands: clip.cpp's getters
# and llama-vocab.cpp's array reads abort the whole process (GGML_ASSERT) on a type mismatch, so the
# runtime checks these before loading. (type, element type, required, (low, high) for numbers).
S, U32, I32, F32, BOOL, ARR = T.STRING, T.UINT32, T.INT32, T.FLOAT32, T.BOOL, T.ARRAY
GGUF_ARCH = "qwen2"
LANGUAGE_KEYS = {
    "general.architecture": (S, None, True, None),
    "qwen2.context_length": (U32, None, True, (1, MAX_POSITIONS * 64)),
    "qwen2.embedding_length": (U32, None, True, (1, MAX_WIDTH)),
    "qwen2.block_count": (U32, None, True, (1, MAX_LAYERS)),
    "qwen2.feed_forward_length": (U32, None, True, (1, MAX_WIDTH)),
    "qwen2.attention.head_count": (U32, None, True, (1, MAX_HEADS)),
    "qwen2.attention.head_count_kv": (U32, None, False, (1, MAX_HEADS)),
    "qwen2.attention.key_length": (U32, None, False, (1, MAX_WIDTH)),
    "qwen2.attention.layer_norm_rms_epsilon": (F32, None, True, (0.0, 1.0)),
    "qwen2.rope.freq_base": (F32, None, False, (1.0, 1e12)),
    "tokenizer.ggml.model": (S, None, True, None),
    "tokenizer.ggml.pre": (S, None, False, None),
    "tokenizer.ggml.tokens": (ARR, S, True, (1, MAX_VOCAB)),
    "tokenizer.ggml.token_type": (ARR, I32, False, (1, MAX_VOCAB)),
    "tokenizer.ggml.scores": (ARR, F32, False, (1, MAX_VOCAB)),
    "tokenizer.ggml.merges": (ARR, S, False, None),
    "tokenizer.chat_template": (S, None, True, None),
}
VISION_KEYS = {
    "general.architecture": (S, None, True, None),
    "clip.projector_type": (S, None, True, None),
    "clip.has_vision_encoder": (BOOL, None, True, None),
    "clip.has_audio_encoder": (BOOL, None, False, None),
    "clip.vision.image_size": (U32, None, True, (1, MAX_IMAGE)),
    "clip.vision.patch_size": (U32, None, True, (1, MAX_IMAGE)),
    "clip.vision.embedding_length": (U32, None, True, (1, MAX_WIDTH)),
    "clip.vision.feed_forward_length": (U32, None, True, (1, MAX_WIDTH)),
    "clip.vision.projection_dim": (U32, None, True, (1, MAX_WIDTH)),
    "clip.vision.block_count": (U32, None, True, (1, MAX_LAYERS)),
    "clip.vision.attention.head_count": (U32, None, True, (1, MAX_HEADS)),
    "clip.vision.attention.head_count_kv": (U32, None, False, (1, MAX_HEADS)),
    "clip.vision.attention.layer_norm_epsilon": (F32, None, True, (0.0, 1.0)),
    "clip.vision.feature_layer": (ARR, I32, False, None),
    "clip.vision.image_mean": (ARR, F32, True, (3, 3)),
    "clip.vision.image_std": (ARR, F32, True, (3, 3)),
    "clip.vision.image_grid_pinpoints": (ARR, I32, False, None),
    "clip.use_gelu": (BOOL, None, False, None),
    "clip.use_silu": (BOOL, None, False, None),
    "clip.vision.mm_patch_merge_type": (S, None, False, None),
    "acestep_gguf.image.resize_shortest_edge": (U32, None, False, (1, MAX_IMAGE)),
    "acestep_gguf.image.resample": (U32, None, False, (0, 5)),
}
PROJECTOR_TYPE = "mlp"


def gguf_hparams(fields: dict, tensor_names, role: str) -> dict:
    """The hyper-parameters ``role_tensors`` needs, read back from one checked GGUF file."""
    if role == "vision":
        h = {"n_embd": fields["clip.vision.projection_dim"], "v_embd": fields["clip.vision.embedding_length"],
             "v_ff": fields["clip.vision.feed_forward_length"], "v_head": fields["clip.vision.attention.head_count"],
             "v_image": fields["clip.vision.image_size"], "v_patch": fields["clip.vision.patch_size"],
             "v_feature_layer": fields["clip.vision.block_count"]}
        h["v_n_pos"] = (h["v_image"] // h["v_patch"]) ** 2 + 1
        return h
    a = GGUF_ARCH
    h = {"n_embd": fields[f"{a}.embedding_length"], "n_ff": fields[f"{a}.feed_forward_length"],
         "n_layer": fields[f"{a}.block_count"], "n_head": fields[f"{a}.attention.head_count"],
         "n_vocab": _count(fields["tokenizer.ggml.tokens"]), "tie_word_embeddings": "output.weight" not in tensor_names}
    h["n_head_kv"] = fields.get(f"{a}.attention.head_count_kv", h["n_head"])
    h["head_dim"] = fields.get(f"{a}.attention.key_length", h["n_embd"] // h["n_head"])
    h["n_q"], h["n_kv"] = h["n_head"] * h["head_dim"], h["n_head_kv"] * h["head_dim"]
    return h


def gguf_problems(h: dict, fields: dict, role: str) -> list[str]:
    """Relations between hyper-parameters that llama.cpp assumes without checking."""
    if role == "language":
        problems = []
        if h["n_head"] % h["n_head_kv"]:
            problems.append("attention.head_count is not a multiple of head_count_kv")
        if h["head_dim"] == 0:
            problems.append("embedding_length is smaller than attention.head_count")
        return problems
    checks = [
        (h["v_image"] % h["v_patch"] or h["v_patch"] > h["v_image"], "clip.vision.image_size is not a multiple of patch_size"),
        (h["v_embd"] % h["v_head"], "clip.vision.embedding_length is not a multiple of attention.head_count"),
        (fields.get("clip.has_vision_encoder") is not True, "clip.has_vision_encoder is not true"),
        (fields.get("clip.use_gelu") and fields.get("clip.use_silu"), "clip.use_gelu and clip.use_silu are both set"),
        (any(not 0 <= k <= h["v_feature_layer"] for k in fields.get("clip.vision.feature_layer", [])),
         "clip.vision.feature_layer is outside the written layers"),
        (fields.get("clip.vision.image_grid_pinpoints"), "clip.vision.image_grid_pinpoints is not used by llava-1.5 models"),
    ]
    return [message for bad, message in checks if bad]


def _count(value) -> int:
    return len(value) if isinstance(value, list) else value.count
