"""The language model's hyper-parameters, read from ``config.json`` exactly as transformers reads them.

One function per field, each following transformers 5.x's own precedence (``PreTrainedConfig``,
``RotaryEmbeddingConfigMixin``, ``LlavaConfig``, the text configs' ``__post_init__``), which also reads
every transformers-4 layout. The family's ``config_defaults`` fill only fields whose absence transformers
itself resolves to its class default; fields with a precedence rule (rope, tying, windows) are never
defaulted beforehand, because a default would shadow the field the rule falls back to — the bug this
module exists to prevent: a transformers-5 ``rope_parameters.rope_theta`` hidden behind a default
``rope_theta``."""

from __future__ import annotations

from ..errors import ConfigError
from .fields import MAX_HEADS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, Fields
from .hparams import TextHParams

DEFAULT_THETA = 10_000.0  # RotaryEmbeddingConfigMixin.default_theta
ROPE_TYPES = ("yarn", "linear")  # what llama.cpp's rope.scaling.type can express for these architectures
# YaRN fields transformers reads beyond factor and original length, with the values llama.cpp assumes.
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0}


def rope_theta(text: Fields) -> float:
    """``rope_parameters.rope_theta`` (or ``rope_scaling``'s, which replaces rope_parameters when set),
    else the top-level ``rope_theta`` (transformers 4), else 10000 — convert_rope_params_to_dict."""
    params = rope_parameters(text)
    fallback = text.number("rope_theta", 1.0, 1e12, DEFAULT_THETA)
    return params.number("rope_theta", 1.0, 1e12, fallback) if params is not None else fallback


def rope_parameters(text: Fields) -> Fields | None:
    """The rope dict transformers keeps: a non-empty ``rope_scaling`` replaces ``rope_parameters``."""
    for key in ("rope_scaling", "rope_parameters"):
        value = text.data.get(key)
        if value is None or value == {}:
            continue
        params = text.section(key)
        if any(isinstance(v, dict) for v in params.data.values()):
            raise ConfigError(f"{params.where}: per-layer-type rope parameters are not supported")
        return params
    return None


def rope_scaling(text: Fields, max_pos: int) -> dict | None:
    """None for plain rope; else {"type", "factor"[, "original_max_position_embeddings"]}. The type is
    ``rope_type``, else the legacy ``type``; YaRN's original length is the dict's, else
    max_position_embeddings (standardize_rope_params)."""
    params = rope_parameters(text)
    if params is None:
        return None
    kind = params.string("rope_type", params.data.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{params.name('rope_type')} {kind!r} is not supported ({', '.join(ROPE_TYPES)})")
    out = {"type": kind, "factor": params.number("factor", 1.0, 1024.0)}
    if kind == "yarn":
        for key, value in YARN_DEFAULTS.items():
            if params.number(key, -1e6, 1e6, value) != value:
                raise ConfigError(f"{params.name(key)} {params.data[key]} is not supported: llama.cpp's YaRN uses {value:g}")
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if key in params.data:
                raise ConfigError(f"{params.name(key)} is not supported: llama.cpp derives YaRN's attention factor itself")
        # (a top-level original_max_position_embeddings is not read for these models: transformers
        # sets config.json's extra keys only after standardising rope)
        original = params.optional_integer("original_max_position_embeddings", 1, MAX_POSITIONS) or max_pos
        out["original_max_position_embeddings"] = original
    return out


def head_dim(text: Fields, n_embd: int, n_head: int) -> int:
    """``head_dim`` when given and not null, else hidden_size // num_attention_heads (every text config)."""
    explicit = text.optional_integer("head_dim", 1, MAX_WIDTH)
    if explicit is None and n_embd < n_head:
        raise ConfigError(f"{text.name('hidden_size')} is smaller than num_attention_heads and no head_dim is given")
    return explicit or n_embd // n_head


def n_head_kv(text: Fields, n_head: int) -> int:
    """``num_key_value_heads``; null means as many as the attention heads (the configs' __post_init__)."""
    n = text.optional_integer("num_key_value_heads", 1, n_head) or n_head
    if n_head % n:
        raise ConfigError(f"{text.name('num_attention_heads')} is not a multiple of num_key_value_heads")
    return n


def tie_word_embeddings(text: Fields, top: Fields, class_default: bool) -> bool:
    """LlavaConfig ties when its own ``tie_word_embeddings`` or the text config's is true; each side
    absent takes its class default (LlavaConfig: false)."""
    return top.boolean("tie_word_embeddings", False) or text.boolean("tie_word_embeddings", class_default)


def sliding_window(text: Fields, model_type: str, n_layer: int, class_default: int | None) -> int | None:
    """The attention window transformers applies, or None for full attention. Qwen2: only with
    ``use_sliding_window``, and only on layers from ``max_window_layers`` on (or as ``layer_types``
    say); Mistral: ``sliding_window`` on every layer (4096 when absent); Llama: none."""
    if model_type == "llama":
        return None
    window = text.optional_integer("sliding_window", 1, MAX_POSITIONS) if "sliding_window" in text.data \
        else class_default
    if window is None:
        return None
    if model_type == "qwen2":
        if not text.boolean("use_sliding_window", False):
            return None
        types = text.data.get("layer_types")
        if types is not None:
            if not (isinstance(types, list) and len(types) == n_layer and all(isinstance(t, str) for t in types)):
                raise ConfigError(f"{text.name('layer_types')} must list one attention type per layer")
            return window if "sliding_attention" in types else None
        return window if text.integer("max_window_layers", 0, MAX_LAYERS, 28) < n_layer else None
    return window


def text_hparams(text: Fields, top: Fields, model_type: str, defaults: dict) -> TextHParams:
    """Everything the language-model GGUF needs, in the converter's names."""
    d = {k: v for k, v in defaults.items() if k not in ("tie_word_embeddings", "sliding_window")}
    plain = Fields({**d, **text.data}, text.where)  # fields without a precedence rule
    n_embd, n_head = plain.integer("hidden_size", 1, MAX_WIDTH), plain.integer("num_attention_heads", 1, MAX_HEADS)
    n_layer = plain.integer("num_hidden_layers", 1, MAX_LAYERS)
    max_pos = plain.integer("max_position_embeddings", 1, MAX_POSITIONS)
    return TextHParams(
        n_vocab=plain.integer("vocab_size", 1, MAX_VOCAB), n_embd=n_embd,
        n_ff=plain.integer("intermediate_size", 1, MAX_WIDTH), n_layer=n_layer, n_head=n_head,
        n_head_kv=n_head_kv(plain, n_head), head_dim=head_dim(plain, n_embd, n_head),
        rms_eps=plain.number("rms_norm_eps", 0.0, 1.0, 1e-6), max_pos=max_pos, rope_theta=rope_theta(text),
        rope_scaling=rope_scaling(text, max_pos),
        tie_word_embeddings=tie_word_embeddings(text, top, defaults.get("tie_word_embeddings", False)),
        sliding_window=sliding_window(text, model_type, n_layer, defaults.get("sliding_window")))
