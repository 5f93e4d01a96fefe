"""The GGUF tokenizer block (gpt2 BPE, qwen2 pre-tokenizer) built from a Hugging Face tokenizer.json."""

from __future__ import annotations

from gguf import GGUFValueType as T
from gguf import TokenType

from ..errors import ConfigError
from ..models.spec import MetadataEntry

# The split regex of Qwen2's tokenizer.json; llama.cpp's 'qwen2' pre-tokenizer implements exactly this.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_patterns(pre) -> list[str]:
    if not isinstance(pre, dict):
        return []
    if pre.get("type") == "Sequence":
        items = pre.get("pretokenizers")
        return [p for item in (items if isinstance(items, list) else []) for p in _split_patterns(item)]
    if pre.get("type") == "Split":
        pattern = pre.get("pattern")
        return [(pattern.get("Regex") or pattern.get("String") or "") if isinstance(pattern, dict) else ""]
    return []


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_metadata(tok: dict, tok_config: dict, config: dict, n_vocab: int) -> list[MetadataEntry]:
    """Tokens padded to the embedding rows, their types, merges and special ids."""
    model = tok.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConfigError(f"tokenizer.json: model.type {model.get('type') if isinstance(model, dict) else model!r} is not supported; Qwen2 uses byte-level BPE")
    splits = _split_patterns(tok.get("pre_tokenizer"))
    if splits != [QWEN2_SPLIT]:
        raise ConfigError("tokenizer.json: pre_tokenizer is not Qwen2's byte-level split; llama.cpp would tokenize "
                          "this vocabulary differently")
    ids: dict[str, int] = {}
    entries = []
    for text, i in model["vocab"].items():
        entries.append((text, i, TokenType.NORMAL, "model.vocab"))
    added_tokens = tok.get("added_tokens", [])
    if not isinstance(added_tokens, list):
        raise ConfigError(f"tokenizer.json: added_tokens is {type(added_tokens).__name__}, expected a list")
    for added in added_tokens:
        if not (isinstance(added, dict) and isinstance(added.get("content"), str)):
            raise ConfigError(f"tokenizer.json: added_tokens entry {str(added)[:60]!r} is not an object with a 'content' string")
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        entries.append((added["content"], added.get("id"), kind, "added_tokens"))
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(TokenType.UNUSED)] * n_vocab
    for text, i, kind, where in entries:
        if type(i) is not int or not 0 <= i < n_vocab:
            raise ConfigError(f"tokenizer.json: {where} token {text[:40]!r} has id {i!r}, outside the {n_vocab} "
                              "embedding rows (text_config.vocab_size)")
        tokens[i], types[i] = text, int(kind)
        ids[text] = i
    _refuse_duplicates(tokens)
    merges = model.get("merges", [])
    if not isinstance(merges, list) or not all(isinstance(m, str) or (isinstance(m, list) and len(m) == 2
                                                and all(isinstance(x, str) for x in m)) for m in merges):
        raise ConfigError("tokenizer.json: model.merges must be a list of 'a b' strings or [a, b] pairs")
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
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


def _refuse_duplicates(tokens: list[str]) -> None:
    """llama.cpp maps token text to id and aborts the whole process (GGML_ASSERT in llama-vocab.cpp)
    when two ids share a text; an empty text is stored as [EMPTY_<id>], as llama.cpp names it."""
    seen: dict[str, int] = {}
    for i, text in enumerate(tokens):
        text = text or f"[EMPTY_{i}]"
        if text in seen:
            raise ConfigError(f"tokenizer.json: token text {text[:40]!r} appears at ids {seen[text]} and {i}; llama.cpp "
                              "needs every token text once (fix added_tokens)")
        seen[text] = i


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
