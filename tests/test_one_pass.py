"""One-pass conversion writes the very files llama.cpp's own quantizer writes: every output of
`convert` equals, byte for byte, what `convert --via-llama-quantize` (a lossless GGUF, then
`llama_model_quantize`) writes from the same checkpoint — on shapes chosen to reach every branch
of llama.cpp's type choice: K-quant rows, rows that need the block-32 fallbacks and the F16 one,
the _M mixes' layer pattern over many layers, GQA, tied and untied embeddings, BF16/F16/F32
sources, Llama's rope un-permutation, the 70B rule, and both mmproj types."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from builders import LLAMA_TOKENIZER_CONFIG, build_model, save_checkpoint, tiny_config, tiny_llama_config
from spm_vocab import llama_tokenizer_json
from tokenizers import Tokenizer

from acestep_gguf import convert
from acestep_gguf.runtime.gguf_header import read_header

ALL = "Q4_K_M,Q5_K_M,Q8_0,F16,BF16"


def qwen2(tokenizer, *, hidden, ff, layers, heads, kv_heads, tie=False, vision_width=32, n_vocab=320):
    cfg = tiny_config(tokenizer, n_vocab=n_vocab, tie=tie, text_layers=layers, hidden=hidden)
    cfg.text_config.intermediate_size = ff
    cfg.text_config.num_attention_heads, cfg.text_config.num_key_value_heads = heads, kv_heads
    cfg.vision_config.hidden_size, cfg.vision_config.intermediate_size = vision_width, 2 * vision_width
    return build_model(cfg)


CASES = {  # each with the types its branches give (in m-Q4_K_M.gguf and mmproj-m-Q8_0.gguf): proof they were taken
    # K-quant rows (256), ffn_down rows of 320 (Q4_K/Q5_K/Q6_K fall back to Q5_0/Q5_1/Q8_0), ten
    # layers of the _M mixes' pattern, 4:1 GQA; a 40-wide vision tower whose rows fit no block (F16)
    "qwen2-k-quants-bf16": dict(
        build="qwen2", dtype="bfloat16", kw=dict(hidden=256, ff=320, layers=10, heads=8, kv_heads=2, vision_width=40),
        language={"output.weight": "Q6_K", "token_embd.weight": "Q4_K", "blk.0.ffn_down.weight": "Q8_0",
                  "blk.4.ffn_down.weight": "Q5_0", "blk.2.attn_v.weight": "Q4_K", "blk.0.attn_v.weight": "Q6_K",
                  "blk.0.attn_norm.weight": "F32"},
        vision={"v.blk.0.attn_q.weight": "F16", "mm.2.weight": "Q8_0", "v.position_embd.weight": "F32"}),
    # tied embeddings: token_embd takes output's rule (rows of 96: Q8_0); an F32 source
    "qwen2-tied-f32": dict(
        build="qwen2", dtype="float32", kw=dict(hidden=96, ff=192, layers=3, heads=4, kv_heads=4, tie=True),
        language={"token_embd.weight": "Q8_0", "blk.1.ffn_up.weight": "Q5_0"}, vision={"mm.0.weight": "Q8_0"}),
    # Llama: q/k rows un-permuted for llama.cpp's rope before quantizing; an F16 source; nine layers
    "llama-rope-f16": dict(
        build="llama", dtype="float16", kw=dict(hidden=256, ff=512, layers=9, heads=8, kv_heads=2),
        language={"blk.0.ffn_down.weight": "Q6_K", "blk.1.ffn_down.weight": "Q4_K", "blk.0.attn_q.weight": "Q4_K"},
        vision={"v.blk.0.attn_q.weight": "Q8_0"}),
}


def build(case: dict, tokenizer, spm):
    """(model, tokenizer, dtype to save in, tokenizer_config.json or None)."""
    dtype = getattr(torch, case["dtype"])
    if case["build"] == "qwen2":
        return qwen2(tokenizer, **case["kw"]), tokenizer, dtype, None
    kw = case["kw"]
    cfg = tiny_llama_config(spm)
    text = cfg.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = kw["hidden"], kw["ff"], kw["layers"]
    text.num_attention_heads, text.num_key_value_heads = kw["heads"], kw["kv_heads"]
    return build_model(cfg), spm, dtype, LLAMA_TOKENIZER_CONFIG


@pytest.fixture(scope="module")
def spm():
    return Tokenizer.from_str(json.dumps(llama_tokenizer_json()))


def same_files(one_pass, reference) -> None:
    assert [f.file for f in one_pass.files] == [f.file for f in reference.files]
    for a, b in zip(one_pass.files, reference.files):
        assert (a.file, a.bytes, a.sha256) == (b.file, b.bytes, b.sha256)


@pytest.mark.parametrize("name", list(CASES))
def test_one_pass_files_equal_llama_quantize_output(name, tmp_path, tokenizer, spm):
    model, tok, dtype, tok_config = build(CASES[name], tokenizer, spm)
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt", dtype=dtype, shards=2, tokenizer_config=tok_config)
    for mmproj in ("Q8_0", "F16"):
        one = convert(ckpt, out=tmp_path / f"one-{mmproj}", quant=ALL, mmproj_quant=mmproj, name="m", threads=2)
        ref = convert(ckpt, out=tmp_path / f"ref-{mmproj}", quant=ALL, mmproj_quant=mmproj, name="m",
                      via_llama_quantize=True)
        same_files(one, ref)
        for f in one.files:  # the manifest's digest, computed while writing, is the file's
            assert hashlib.sha256((tmp_path / f"one-{mmproj}" / f.file).read_bytes()).hexdigest() == f.sha256
    for file, expected in (("m-Q4_K_M.gguf", CASES[name]["language"]), ("mmproj-m-Q8_0.gguf", CASES[name]["vision"])):
        types = {t.name: t.type.name for t in read_header(tmp_path / "one-Q8_0" / file).tensors}
        assert {tensor: types.get(tensor) for tensor in expected} == expected, file
    tied = CASES[name]["kw"].get("tie", False)
    assert ("output.weight" in {t.name for t in read_header(tmp_path / "one-Q8_0" / "m-Q4_K_M.gguf").tensors}) != tied


def test_the_70b_rule_matches_llama_cpp_for_an_80_layer_qwen2(tmp_path, tokenizer):
    """llama.cpp's loader calls an 80-layer Qwen2 a 70B model, and the _M mixes then store attn_v with
    Q5_K where they would use Q4_K (here, rows of 64: Q5_1 where Q5_0)."""
    model = qwen2(tokenizer, hidden=64, ff=128, layers=80, heads=4, kv_heads=2)
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "ckpt", dtype=torch.bfloat16)
    one = convert(ckpt, out=tmp_path / "one", quant="Q4_K_M", name="m")
    ref = convert(ckpt, out=tmp_path / "ref", quant="Q4_K_M", name="m", via_llama_quantize=True)
    same_files(one, ref)
    types = {t.name: t.type.name for t in read_header(tmp_path / "one" / "m-Q4_K_M.gguf").tensors}
    assert types["blk.20.attn_v.weight"] == "Q5_1" and types["blk.20.attn_q.weight"] == "Q5_0"


def test_more_threads_write_the_same_bytes(tmp_path, tokenizer):
    """Row ranges quantized in parallel (uneven splits with three threads) land where one thread puts them."""
    model = qwen2(tokenizer, hidden=256, ff=1280, layers=2, heads=8, kv_heads=2)
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "ckpt", dtype=torch.bfloat16)
    one = convert(ckpt, out=tmp_path / "t1", quant=ALL, name="m", threads=1)
    three = convert(ckpt, out=tmp_path / "t3", quant=ALL, name="m", threads=3)
    same_files(three, one)


def test_one_pass_needs_no_temporary_disk(tmp_path, tiny_checkpoint, monkeypatch):
    """Nothing but the outputs is ever written: each time an output file is opened, the folder holds
    only the outputs' *.partial files (no lossless intermediate)."""
    from acestep_gguf.convert import one_pass
    seen: set[str] = set()
    opened = one_pass.HashingFile.__init__

    def watching(self, path):
        opened(self, path)
        seen.update(os.listdir(path.parent))
    monkeypatch.setattr(one_pass.HashingFile, "__init__", watching)
    convert(tiny_checkpoint, out=tmp_path / "out", quant="all", name="m")
    assert seen == {"m-Q4_K_M.gguf.partial", "m-Q5_K_M.gguf.partial", "m-Q8_0.gguf.partial",
                    "mmproj-m-F16.gguf.partial"}
    assert sorted(os.listdir(tmp_path / "out")) == ["m-Q4_K_M.gguf", "m-Q5_K_M.gguf", "m-Q8_0.gguf", "manifest.json",
                                                    "mmproj-m-F16.gguf"]


def test_a_value_beyond_f16_is_refused_in_an_f16_output_as_llama_cpp_refuses_it(tmp_path, fresh_checkpoint):
    """BF16 holds 1e5, F16 does not (its largest value is 65504): llama.cpp's quantizer fails its row
    validation on the converted F16 tensor; the one-pass writer says which tensor, in one line.
    Q8_0 stores the same value fine (its scale is an F16 of max/127)."""
    from test_convert_errors import assert_clean_failure, cli, edit_state
    ckpt = fresh_checkpoint(dtype=torch.bfloat16)
    edit_state(ckpt, lambda s: s["language_model.model.layers.1.mlp.up_proj.weight"].__setitem__((3, 5), 1e5))
    assert_clean_failure(cli("convert", ckpt, "--out", tmp_path / "f16", "--quant", "F16"),
                         "model.safetensors: tensor 'language_model.model.layers.1.mlp.up_proj.weight'", "do not fit F16", out=tmp_path / "f16")
    reference = cli("convert", ckpt, "--out", tmp_path / "ref", "--quant", "F16", "--via-llama-quantize")
    assert reference.exit_code == 1 and "quantizer failed for F16" in reference.stderr
    assert cli("convert", ckpt, "--out", tmp_path / "q8", "--quant", "Q8_0", "--quiet").exit_code == 0


LADDER = "Q2_K,Q3_K_S,Q3_K_M,Q3_K_L,IQ3_S,IQ3_M,IQ4_XS,IQ4_NL,Q4_0,Q4_K_S,Q5_K_S,Q6_K"


@pytest.mark.parametrize("shape", [
    dict(hidden=256, ff=512, layers=17, heads=8, kv_heads=2),  # every matrix in 256-blocks, 4:1 GQA
    dict(hidden=256, ff=320, layers=9, heads=8, kv_heads=8),  # ffn_down rows of 320: the block-32 fallbacks
])
def test_the_lower_types_equal_llama_quantize_output(tmp_path, tokenizer, shape):
    """Q2_K to Q6_K and the IQ3/IQ4 types (those llama.cpp makes without an importance matrix), byte
    for byte as llama_model_quantize writes them, over layer counts that reach the mixes' layer rules."""
    model = qwen2(tokenizer, **shape)
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "ckpt", dtype=torch.bfloat16)
    one = convert(ckpt, out=tmp_path / "one", quant=LADDER, name="m", threads=2)
    ref = convert(ckpt, out=tmp_path / "ref", quant=LADDER, name="m", via_llama_quantize=True)
    same_files(one, ref)
    kinds = {t.type.name for f in LADDER.split(",") for t in read_header(tmp_path / "one" / f"m-{f}.gguf").tensors}
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ3_S", "IQ4_XS", "Q4_0"} <= kinds
