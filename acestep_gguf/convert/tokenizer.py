"""The GGUF tokenizer block, built from a Hugging Face tokenizer.json, for each tokenizer kind a
family can use (models/tokenizers.py says what llama.cpp reads back):

- "gpt2": byte-level BPE whose split regex is one llama.cpp implements (Qwen2's, or Llama-3's as
  Pixtral uses it): tokens, types and merges as they are.
- "llama": SentencePiece vocabularies as transformers stores them (BPE with byte fallback and "▁"
  for spaces). llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result has the
  highest score, Hugging Face's BPE the pair with the lowest merge rank; giving each piece the score
  -(rank of the first merge that makes it) orders both the same way (checked against llama.cpp's own
  reference vectors in the tests). llama.cpp's own HF path writes -1000 for every piece instead."""

from __future__ import annotations

import re

from gguf import GGUFValueType as T
from gguf import TokenType

from ..errors import ConfigError
from ..models.fields import MAX_VOCAB, Fields
from ..models.spec import MetadataEntry

# The split regex of Qwen2's tokenizer.json; llama.cpp's 'qwen2' pre-tokenizer implements exactly this.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama-3's split, which mistral-community/pixtral-12b's tokenizer.json uses (digits in threes); llama.cpp's
# 'pixtral' pre-tokenizer is exactly this (its own converter names pixtral-12b's vocabulary so).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "pixtral"}  # split regex -> llama.cpp's pre-tokenizer
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def tokenizer_metadata(kind: str, tok: dict, tok_config: dict, config: dict, n_vocab: int) -> list[MetadataEntry]:
    """Tokens padded to the embedding rows, their types (and scores), merges or flags, special ids."""
    model = tok.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        found = model.get("type") if isinstance(model, dict) else model
        raise ConfigError(f"tokenizer.json: model.type {found!r} is not supported; expected a BPE vocabulary")
    merges = _merges(model)
    tokens, types, ids = _tokens(tok, model, n_vocab)
    meta = BUILDERS[kind](tok, model, merges, tokens, types)
    meta.append(MetadataEntry("tokenizer.ggml.add_bos_token", _add_bos(kind, tok_config), T.BOOL))
    text_config = config.get("text_config") or {}
    for role, key in (("eos", "eos_token_id"), ("padding", "pad_token_id"), ("bos", "bos_token_id"),
                      ("unknown", None)):
        token_id = _special_id(role, key, tok_config, text_config, config, ids, model, n_vocab)
        if token_id is not None:
            meta.append(MetadataEntry(f"tokenizer.ggml.{role}_token_id", token_id, T.UINT32))
    return meta


def _gpt2(tok: dict, model: dict, merges: list[str], tokens: list[str], types: list[int]) -> list[MetadataEntry]:
    splits = _split_patterns(tok.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(splits[0]) if len(splits) == 1 else None
    if pre is None:
        raise ConfigError("tokenizer.json: pre_tokenizer is not a byte-level split llama.cpp implements (Qwen2's or "
                          "Llama-3's); llama.cpp would tokenize this vocabulary differently")
    if not merges:
        raise ConfigError("tokenizer.json: model.merges is empty")
    return [MetadataEntry("tokenizer.ggml.model", "gpt2", T.STRING), MetadataEntry("tokenizer.ggml.pre", pre, T.STRING),
            MetadataEntry("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
            MetadataEntry("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
            MetadataEntry("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING)]


def _llama(tok: dict, model: dict, merges: list[str], tokens: list[str], types: list[int]) -> list[MetadataEntry]:
    if not model.get("byte_fallback"):
        raise ConfigError("tokenizer.json: model.byte_fallback is not set; a SentencePiece (Llama) vocabulary needs "
                          "its <0x00>..<0xFF> byte pieces")
    first: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        first.setdefault(merge.replace(" ", "", 1), rank)
    scores = [-float(first[t]) if t in first else 0.0 for t in tokens]
    for i, text in enumerate(tokens):
        if types[i] == TokenType.NORMAL and BYTE_PIECE.fullmatch(text):
            types[i] = int(TokenType.BYTE)
        elif text == model.get("unk_token"):
            types[i] = int(TokenType.UNKNOWN)
    return [MetadataEntry("tokenizer.ggml.model", "llama", T.STRING), MetadataEntry("tokenizer.ggml.pre", "default", T.STRING),
            MetadataEntry("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
            MetadataEntry("tokenizer.ggml.scores", scores, T.ARRAY, T.FLOAT32),
            MetadataEntry("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
            MetadataEntry("tokenizer.ggml.add_space_prefix", _adds_space_prefix(tok), T.BOOL)]


BUILDERS = {"gpt2": _gpt2, "llama": _llama}


def _merges(model: dict) -> list[str]:
    merges = model.get("merges", [])
    if not isinstance(merges, list) or not all(isinstance(m, str) or (isinstance(m, list) and len(m) == 2
                                                and all(isinstance(x, str) for x in m)) for m in merges):
        raise ConfigError("tokenizer.json: model.merges must be a list of 'a b' strings or [a, b] pairs")
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _tokens(tok: dict, model: dict, n_vocab: int) -> tuple[list[str], list[int], dict[str, int]]:
    """Texts and types by id, padded to the embedding rows; every id checked, no text twice."""
    entries = [(text, i, TokenType.NORMAL, "model.vocab") for text, i in model["vocab"].items()]
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
    ids: dict[str, int] = {}
    for text, i, kind, where in entries:
        if type(i) is not int or not 0 <= i < n_vocab:
            raise ConfigError(f"tokenizer.json: {where} token {text[:40]!r} has id {i!r}, outside the {n_vocab} "
                              "embedding rows (text_config.vocab_size)")
        tokens[i], types[i] = text, int(kind)
        ids[text] = i
    _refuse_duplicates(tokens)
    return tokens, types, ids


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


def _adds_space_prefix(tok: dict) -> bool:
    """SentencePiece's leading '▁': a Prepend normalizer (transformers' legacy Llama) or a Metaspace
    pre-tokenizer that prepends."""
    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "Prepend" and node.get("prepend") == "▁":
                return True
            if node.get("type") == "Metaspace":
                return node.get("prepend_scheme", "always") != "never" and node.get("add_prefix_space", True) is not False
            return any(walk(v) for v in node.values() if isinstance(v, (dict, list)))
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False
    return walk(tok.get("normalizer")) or walk(tok.get("pre_tokenizer"))


def _add_bos(kind: str, tok_config: dict) -> bool:
    value = tok_config.get("add_bos_token", kind == "llama")  # Llama tokenizers add <s> unless told not to
    if not isinstance(value, bool):
        raise ConfigError(f"tokenizer_config.json: add_bos_token is {value!r}, expected true or false")
    return value


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _special_id(role: str, key: str | None, tok_config: dict, text_config: dict, config: dict, ids: dict,
                model: dict, n_vocab: int) -> int | None:
    """tokenizer_config's token string first (what chat uses), then config.json's id."""
    name = {"eos": "eos_token", "padding": "pad_token", "bos": "bos_token", "unknown": "unk_token"}[role]
    text = _token_text(tok_config.get(name)) or (model.get("unk_token") if role == "unknown" else None)
    if text is not None:
        if text not in ids:
            raise ConfigError(f"tokenizer_config.json: {name} {text!r} is not in the vocabulary")
        return ids[text]
    value = text_config.get(key, config.get(key)) if key else None
    if isinstance(value, list):
        value = value[0] if value else None
    if type(value) is not int:
        return None
    if not 0 <= value < n_vocab:
        raise ConfigError(f"config.json: {key} {value} is not a token id (0..{n_vocab - 1})")
    return value


def image_placeholder(tok: dict, config: dict) -> str | None:
    """The text of the checkpoint's image token (``image_token_index``, transformers 5's
    ``image_token_id``; LlavaConfig's default 32000): what its chat template writes per picture."""
    top = Fields(config, "config.json")
    key = "image_token_id" if "image_token_id" in config else "image_token_index"
    token_id = top.integer(key, 0, MAX_VOCAB, 32000)
    model = tok.get("model") if isinstance(tok.get("model"), dict) else {}
    for added in tok.get("added_tokens") or []:
        if isinstance(added, dict) and added.get("id") == token_id and isinstance(added.get("content"), str):
            return added["content"]
    vocab = model.get("vocab") if isinstance(model.get("vocab"), dict) else {}
    return next((text for text, i in vocab.items() if i == token_id), None)
