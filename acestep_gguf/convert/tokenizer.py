"""The GGUF tokenizer block (gpt2 BPE, qwen2 pre-tokenizer) built from a Hugging Face tokenizer.json."""

from __future__ import annotations

from gguf import GGUFValueType as T
from gguf import TokenType

from ..errors import ConfigError
from ..models.spec import MetadataEntry

# The split regex of Qwen2's tokenizer.json; llama.cpp's 'qwen2' pre-tokenizer implements exactly this.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_patterns(pre: dict | None) -> list[str]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [p for item in pre.get("pretokenizers", []) for p in _split_patterns(item)]
    if pre.get("type") == "Split":
        pattern = pre.get("pattern", {})
        return [pattern.get("Regex") or pattern.get("String") or ""]
    return []


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_metadata(tok: dict, tok_config: dict, config: dict, n_vocab: int) -> list[MetadataEntry]:
    """Tokens padded to the embedding rows, their types, merges and special ids."""
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConfigError(f"tokenizer.json: model.type {model.get('type')!r} is not supported; Qwen2 uses byte-level BPE")
    splits = _split_patterns(tok.get("pre_tokenizer"))
    if splits != [QWEN2_SPLIT]:
        raise ConfigError("tokenizer.json: pre_tokenizer is not Qwen2's byte-level split; llama.cpp would tokenize "
                          "this vocabulary differently")
    ids: dict[str, int] = dict(model["vocab"])
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(TokenType.UNUSED)] * n_vocab
    entries = [(text, i, TokenType.NORMAL) for text, i in ids.items()]
    for added in tok.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        entries.append((added["content"], added["id"], kind))
        ids[added["content"]] = added["id"]
    for text, i, kind in entries:
        if not isinstance(i, int) or not 0 <= i < n_vocab:
            raise ConfigError(f"tokenizer.json: token {text!r} has id {i}, outside the {n_vocab} embedding rows "
                              "(text_config.vocab_size)")
        tokens[i], types[i] = text, int(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise ConfigError("tokenizer.json: model.merges is empty")

    meta = [
        MetadataEntry("tokenizer.ggml.model", "gpt2", T.STRING),
        MetadataEntry("tokenizer.ggml.pre", "qwen2", T.STRING),
        MetadataEntry("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
        MetadataEntry("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
        MetadataEntry("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING),
        MetadataEntry("tokenizer.ggml.add_bos_token", bool(tok_config.get("add_bos_token", False)), T.BOOL),
    ]
    text_config = config.get("text_config") or {}
    for role, key in (("eos", "eos_token_id"), ("padding", "pad_token_id"), ("bos", "bos_token_id")):
        token_id = _special_id(role, key, tok_config, text_config, config, ids)
        if token_id is not None:
            meta.append(MetadataEntry(f"tokenizer.ggml.{role}_token_id", token_id, T.UINT32))
    return meta


def _special_id(role: str, key: str, tok_config: dict, text_config: dict, config: dict, ids: dict) -> int | None:
    """tokenizer_config's token string first (what chat uses), then config.json's id."""
    name = {"eos": "eos_token", "padding": "pad_token", "bos": "bos_token"}[role]
    text = _token_text(tok_config.get(name))
    if text is not None:
        if text not in ids:
            raise ConfigError(f"tokenizer_config.json: {name} {text!r} is not in the vocabulary")
        return ids[text]
    value = text_config.get(key, config.get(key))
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None
