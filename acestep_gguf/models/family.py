"""The Family type: one supported checkpoint layout as one typed object.

A family is a language model (a LanguageModel: llama.cpp's architecture, the tokenizer, q/k/v biases,
the built-in template — the tables here) plus a vision tower with its projector (a plug-in module
implementing models/tower.py: clip.py, llava_next.py, pixtral.py). A family module (llava_qwen2.py, llava_llama.py) is a few
rows of data; the pipeline, runtime and planner ask the Family and never name an architecture.
GGUF tensor names and metadata keys come from gguf-py's constants."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from gguf import MODEL_TENSOR as MT
from gguf import GGUFValueType as T
from gguf import Keys

from ..errors import ConfigError
from ..templates import PLACEHOLDER_KEY
from .clip import CLIP, tn
from .fields import MAX_HEADS, MAX_LAYERS, MAX_POSITIONS, MAX_WIDTH, Fields
from .hparams import HParams, TextHParams, VisionHParams
from .spec import Ignored, MetadataEntry, TensorSpec, expand
from .text_hparams import text_hparams
from .tokenizers import TOKENIZER_KEYS
from .tower import VisionTower


# Source-name prefixes of the language half → canonical prefixes; the first match wins, so longer
# prefixes come first (the vision tower adds its own after these).
LANGUAGE_REPLACEMENTS = (
    ("model.language_model.", "text."),  # transformers 5, in-memory names
    ("language_model.model.", "text."),  # transformers 4 hub checkpoints
    ("language_model.lm_head.", "lm_head."),  # transformers 4 hub checkpoints
    ("lm_head.", "lm_head."),  # transformers 5
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
LANGUAGE_IGNORED = (Ignored("text.rotary_emb.inv_freq", "llama.cpp recomputes rotary frequencies"),)
S, U32, F32 = T.STRING, T.UINT32, T.FLOAT32


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
    is_70b: Callable[[TextHParams], bool] = lambda h: False  # noqa: E731


@dataclass(frozen=True)
class Family:
    """One supported checkpoint layout — a language model and a vision tower (with its projector) —
    how to recognise it, and everything the converter, runtime and planner need to know about it."""

    name: str
    architectures: tuple[str, ...]  # config.json "architectures"
    language: LanguageModel
    description: str  # for messages: "Qwen2 + CLIP + MLP projector"
    vision: VisionTower = CLIP  # the tower plug-in (models/tower.py)

    @property
    def gguf_arch(self) -> str:
        return self.language.gguf_arch

    @property
    def projector_type(self) -> str:
        return self.vision.projector_type

    @property
    def vision_model_types(self) -> tuple[str, ...]:
        return self.vision.model_types

    @property
    def replacements(self) -> tuple:
        return LANGUAGE_REPLACEMENTS + self.vision.replacements

    def matches(self, config: dict) -> bool:
        """True for a config.json of this family: architecture and both sub-model types."""
        text, vision = config.get("text_config"), config.get("vision_config")
        return (any(a in self.architectures for a in config.get("architectures") or [])
                and isinstance(text, dict) and text.get("model_type") in self.language.model_types
                and isinstance(vision, dict) and vision.get("model_type") in self.vision.model_types)

    # -- config.json -> hyper-parameters ------------------------------------------------------------
    def hparams(self, config: dict, preprocessor: dict, tokenizer: dict | None = None) -> HParams:
        """The hyper-parameters both GGUF files need, validated (types and bounds), in the converter's own
        names. ``tokenizer`` (tokenizer.json) for towers that need a token's id (Pixtral's [IMG_BREAK])."""
        top = Fields(config, "config.json")
        text, vision = top.section("text_config"), top.section("vision_config")
        if text.data.get("model_type") not in self.language.model_types:
            raise ConfigError(f"config.json: text_config.model_type is {text.data.get('model_type')!r}; {self.name} "
                              f"takes {', '.join(self.language.model_types)}")
        if vision.data.get("model_type") not in self.vision.model_types:
            raise ConfigError(f"config.json: vision_config.model_type is {vision.data.get('model_type')!r}; only "
                              f"{', '.join(self.vision.model_types)} is supported")
        model_type = text.data["model_type"]
        t = text_hparams(text, top, model_type, self.language.config_defaults[model_type])
        return HParams(t, self.vision.hparams(vision, top, Fields(preprocessor, "preprocessor_config.json"), tokenizer,
                                              n_embd=t.n_embd))

    # -- tensors -----------------------------------------------------------------------------------
    def tensors(self, h: HParams) -> list[TensorSpec]:
        """Every tensor both outputs must contain, with the shape config.json implies."""
        return self.role_tensors(h.text, "language") + self.role_tensors(h.vision, "vision")

    def role_tensors(self, h: TextHParams | VisionHParams, role: str) -> list[TensorSpec]:
        """The tensors of one output file (language model or mmproj), from its half's hyper-parameters."""
        if role == "vision":
            return self.vision.tensors(h)
        block = DECODER_BLOCK + (QKV_BIASES if self.language.qkv_bias else ())
        specs = expand(LANGUAGE, h, "language") + expand(block, h, "language", h.n_layer)
        specs += [] if h.tie_word_embeddings else expand(LANGUAGE_HEAD, h, "language")
        if not self.language.rope_permute:
            return specs
        heads = {tn(kind, ".weight").format(bid=i): n for i in range(h.n_layer)
                 for kind, n in ((MT.ATTN_Q, h.n_head), (MT.ATTN_K, h.n_head_kv))}
        return [replace(s, rope_heads=heads.get(s.gguf_name, 0)) for s in specs]

    def ignored(self, hp: HParams) -> list[Ignored]:
        """Source tensors that exist in real checkpoints but are deliberately not converted."""
        h = hp.text
        skipped = list(LANGUAGE_IGNORED) + self.vision.ignored(hp.vision)
        if h.tie_word_embeddings:
            skipped.append(Ignored("lm_head.weight", "tie_word_embeddings: the output reuses token_embd"))
        skipped += [Ignored(f"text.layers.{i}.self_attn.rotary_emb.inv_freq", "llama.cpp recomputes rotary frequencies")
                    for i in range(h.n_layer)]
        return skipped

    # -- GGUF metadata -----------------------------------------------------------------------------
    def language_metadata(self, h: TextHParams) -> list[MetadataEntry]:
        """<arch>.* keys of the language-model GGUF (tokenizer and template are added separately)."""
        a = self.gguf_arch
        entries = [
            MetadataEntry(Keys.LLM.CONTEXT_LENGTH.format(arch=a), context_length(h), T.UINT32),
            MetadataEntry(Keys.LLM.EMBEDDING_LENGTH.format(arch=a), h.n_embd, T.UINT32),
            MetadataEntry(Keys.LLM.BLOCK_COUNT.format(arch=a), h.n_layer, T.UINT32),
            MetadataEntry(Keys.LLM.FEED_FORWARD_LENGTH.format(arch=a), h.n_ff, T.UINT32),
            MetadataEntry(Keys.Attention.HEAD_COUNT.format(arch=a), h.n_head, T.UINT32),
            MetadataEntry(Keys.Attention.HEAD_COUNT_KV.format(arch=a), h.n_head_kv, T.UINT32),
            MetadataEntry(Keys.Attention.LAYERNORM_RMS_EPS.format(arch=a), h.rms_eps, T.FLOAT32),
            MetadataEntry(Keys.Rope.FREQ_BASE.format(arch=a), h.rope_theta, T.FLOAT32),
        ]
        if h.head_dim * h.n_head != h.n_embd:
            entries.append(MetadataEntry(Keys.Attention.KEY_LENGTH.format(arch=a), h.head_dim, T.UINT32))
            entries.append(MetadataEntry(Keys.Attention.VALUE_LENGTH.format(arch=a), h.head_dim, T.UINT32))
        scaling = h.rope_scaling
        if scaling:
            entries += [MetadataEntry(Keys.Rope.SCALING_TYPE.format(arch=a), scaling["type"], T.STRING),
                        MetadataEntry(Keys.Rope.SCALING_FACTOR.format(arch=a), float(scaling["factor"]), T.FLOAT32)]
            if scaling["type"] == "yarn":
                original = int(scaling.get("original_max_position_embeddings", h.max_pos))
                entries.append(MetadataEntry(Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=a), original, T.UINT32))
        return entries

    def vision_metadata(self, h: VisionHParams) -> list[MetadataEntry]:
        """clip.* keys of the mmproj GGUF (the tower's)."""
        return self.vision.metadata(h)

    # -- reading a GGUF back (the runtime's checks) ------------------------------------------------
    def keys(self, role: str) -> dict:
        """The keys llama.cpp reads from one file, with the types it demands."""
        if role == "vision":
            return self.vision.keys
        return {**_language_keys(self.gguf_arch), **TOKENIZER_KEYS[self.language.tokenizer]}

    def gguf_hparams(self, fields: dict, tensor_names, role: str) -> TextHParams | VisionHParams:
        """The hyper-parameters ``role_tensors`` needs, read back from one checked GGUF file."""
        if role == "vision":
            return self.vision.gguf_hparams(fields)
        a = self.gguf_arch
        tokens = fields[Keys.Tokenizer.LIST]
        n_embd, n_head = fields[Keys.LLM.EMBEDDING_LENGTH.format(arch=a)], fields[Keys.Attention.HEAD_COUNT.format(arch=a)]
        return TextHParams(n_vocab=len(tokens) if isinstance(tokens, list) else tokens.count, n_embd=n_embd,
                           n_ff=fields[Keys.LLM.FEED_FORWARD_LENGTH.format(arch=a)],
                           n_layer=fields[Keys.LLM.BLOCK_COUNT.format(arch=a)], n_head=n_head,
                           n_head_kv=fields.get(Keys.Attention.HEAD_COUNT_KV.format(arch=a), n_head),
                           head_dim=fields.get(Keys.Attention.KEY_LENGTH.format(arch=a), n_embd // n_head),
                           tie_word_embeddings=tn(MT.OUTPUT, ".weight") not in tensor_names)

    def gguf_problems(self, h: TextHParams | VisionHParams, fields: dict, role: str) -> list[str]:
        """Relations between hyper-parameters that llama.cpp assumes without checking."""
        if role == "vision":
            return self.vision.gguf_problems(h, fields)
        checks = [(h.n_head % h.n_head_kv, "attention.head_count is not a multiple of head_count_kv"),
                  (h.head_dim == 0, "embedding_length is smaller than attention.head_count")]
        return [message for bad, message in checks if bad]


def context_length(h: TextHParams) -> int:
    """The trained context: YaRN's factor × original length when scaled (Qwen2.5: 4 × 32768)."""
    scaling = h.rope_scaling
    if scaling and scaling["type"] == "yarn":
        original = int(scaling.get("original_max_position_embeddings", h.max_pos))
        return max(h.max_pos, int(original * float(scaling["factor"])))
    return h.max_pos
