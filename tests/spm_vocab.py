"""A real SentencePiece vocabulary for the Llama-family tests, offline: llama.cpp ships Llama's
32000-piece vocabulary (models/ggml-vocab-llama-spm.gguf, kept by tools/build_llama_cpp.sh) with
reference tokenizations made by the real tokenizer. From it we rebuild the tokenizer.json that
transformers' LlamaConverter writes (BPE with byte fallback; merges from the pieces' scores, as its
SentencePieceExtractor makes them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from gguf import GGUFReader

VERSION = "0.3.36"
DATA = Path(os.environ.get("ACESTEP_GGUF_TEST_DATA", Path.home() / ".cache" / "acestep-gguf" / "test-data")) \
    / f"llama-cpp-python-{VERSION}"
LLAMA_SPM = "ggml-vocab-llama-spm.gguf"


def data_file(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.fail(f"{path} missing; run tools/build_llama_cpp.sh (the README's setup step)")
    return path


def reference_vectors(vocab: str) -> list[tuple[str, list[int]]]:
    texts = data_file(vocab + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    ids = [[int(t) for t in line.split()] for line in data_file(vocab + ".out").read_text(encoding="utf-8").splitlines()]
    assert len(texts) == len(ids) > 30
    return list(zip(texts, ids))


def llama_tokenizer_json(extra_specials=("<image>", "<pad>")) -> dict:
    reader = GGUFReader(data_file(LLAMA_SPM))
    field = reader.fields["tokenizer.ggml.tokens"]
    pieces = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for piece, score in sorted(((p, s) for p, s, t in zip(pieces, scores, types) if t == 1), key=lambda x: -x[1]):
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    special = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": True} for i, p in enumerate(pieces) if types[i] in (2, 3)]
    special += [{"id": len(pieces) + k, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for k, text in enumerate(extra_specials)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                          {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        # <s> before every text, as llava-hf's tokenizer.json (LlamaConverter) has it
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
    }
