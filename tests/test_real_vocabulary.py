"""A real Qwen2 vocabulary (151k tokens, from llama.cpp's own test data): after conversion, llama.cpp
tokenizes exactly like Hugging Face `tokenizers` and like llama.cpp's recorded test vectors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from builders import build_model, save_checkpoint, tiny_config
from gguf import GGUFReader
from tokenizers import Tokenizer

from acestep_gguf import convert
from acestep_gguf.convert.tokenizer import QWEN2_SPLIT

VERSION = "0.3.36"
VOCAB = "ggml-vocab-qwen2.gguf"
CACHE = Path(os.environ.get("ACESTEP_GGUF_TEST_DATA", Path.home() / ".cache" / "acestep-gguf" / "test-data"))


@pytest.fixture(scope="module")
def vocab_files() -> Path:
    """ggml-vocab-qwen2.gguf + .inp + .out, put there by tools/build_llama_cpp.sh (the README's setup)."""
    folder = CACHE / f"llama-cpp-python-{VERSION}"
    missing = [VOCAB + s for s in ("", ".inp", ".out") if not (folder / (VOCAB + s)).is_file()]
    if missing:
        pytest.fail(f"{folder}: {', '.join(missing)} missing; run tools/build_llama_cpp.sh (the README's setup step)")
    return folder


def tokenizer_json_from_gguf(path: Path) -> dict:
    """Rebuild the Hugging Face tokenizer.json that the vocabulary file was made from."""
    reader = GGUFReader(path)
    tokens = [bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in reader.fields["tokenizer.ggml.tokens"].data]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [bytes(reader.fields["tokenizer.ggml.merges"].parts[i]).decode() for i in reader.fields["tokenizer.ggml.merges"].data]
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == 1}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, (t, k) in enumerate(zip(tokens, types)) if k == 3]
    added.append({"id": len(tokens), "content": "<image>", "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True})
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


@pytest.fixture(scope="module")
def converted_qwen2(tmp_path_factory, vocab_files):
    folder = tmp_path_factory.mktemp("qwen2vocab")
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json_from_gguf(vocab_files / VOCAB)))
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = build_model(tiny_config(tok, n_vocab=152064))  # padded like Qwen2.5's embedding
    ckpt = save_checkpoint(model, tok, folder / "ckpt", dtype=__import__("torch").bfloat16)
    convert(ckpt, out=folder / "out", quant="Q8_0", name="q")
    return tok, folder / "out" / "q-Q8_0.gguf"


def test_llama_cpp_tokenizes_like_tokenizers_and_the_reference_vectors(vocab_files, converted_qwen2):
    from llama_cpp import Llama

    tok, gguf_path = converted_qwen2
    texts = (vocab_files / (VOCAB + ".inp")).read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    expected = (vocab_files / (VOCAB + ".out")).read_text(encoding="utf-8").splitlines()
    assert len(texts) == len(expected) > 30
    llm = Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        for text, reference in zip(texts, expected):
            reference = [int(t) for t in reference.split()]
            assert tok.encode(text, add_special_tokens=False).ids == reference, repr(text)
            assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == reference, repr(text)
        chat = "<|im_start|>user\nHello<|im_end|>"
        assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok.encode(chat).ids
    finally:
        llm.close()


def test_vocabulary_is_padded_to_the_embedding_rows(converted_qwen2):
    reader = GGUFReader(converted_qwen2[1])
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 152064
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == 151645  # <|im_end|>


def test_fast_header_reader_agrees_with_gguf_py(converted_qwen2):
    """The runtime's header reader (no per-token parsing) against gguf-py on a 152k-token file."""
    from acestep_gguf.runtime.gguf_header import LongArray, read_header
    from acestep_gguf.runtime.inspect import describe

    path = converted_qwen2[1]
    ours, reference = read_header(path), GGUFReader(path)
    assert ours.fields["tokenizer.ggml.tokens"] == LongArray(152064)
    assert ours.fields["tokenizer.ggml.merges"] == LongArray(len(reference.fields["tokenizer.ggml.merges"].data))
    for key in ("general.architecture", "qwen2.embedding_length", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert ours.fields[key] == reference.fields[key].contents()
    assert [(t.name, t.shape, t.n_bytes) for t in ours.tensors] == \
        [(t.name, tuple(int(d) for d in t.shape), int(t.n_bytes)) for t in reference.tensors]
    assert "152064 tokens" in describe(path)["tokenizer"]
