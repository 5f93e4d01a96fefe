"""Checkpoint files of the wrong type, size or kind: every field of every file we read gives one
line naming the file and field, exit 1, nothing written — never a traceback, a hang or a MemoryError."""

from __future__ import annotations

import json
import os
import struct

import pytest
from test_convert_errors import assert_clean_failure, cli

from acestep_gguf.convert.template import problem


def edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("file,change,needle", [
    ("config.json", lambda c: c["text_config"].update(hidden_size="64"), "text_config.hidden_size is '64', expected a whole number"),
    ("config.json", lambda c: c["text_config"].update(num_hidden_layers=1e9), "num_hidden_layers is 1000000000, outside"),
    ("config.json", lambda c: c["text_config"].update(num_hidden_layers=True), "num_hidden_layers is True"),
    ("config.json", lambda c: c["text_config"].update(vocab_size=-5), "vocab_size is -5, outside"),
    ("config.json", lambda c: c.update(text_config=[1, 2]), "config.json: text_config is a list, expected a JSON object"),
    ("config.json", lambda c: c["vision_config"].update(image_size=10 ** 9), "vision_config.image_size is 1000000000"),
    ("config.json", lambda c: c["text_config"].update(rope_scaling={"type": "yarn", "factor": "4"}), "factor is '4'"),
    ("config.json", lambda c: c["text_config"].update(rope_scaling="yarn"), "rope_scaling is a string"),
    ("config.json", lambda c: c["text_config"].update(tie_word_embeddings="no"), "tie_word_embeddings is 'no'"),
    ("config.json", lambda c: c.update(vision_feature_select_strategy=["default"]), "vision_feature_select_strategy"),
    ("preprocessor_config.json", lambda p: p.update(crop_size=[56, 56]), "crop_size is [56, 56], expected a whole number"),
    ("preprocessor_config.json", lambda p: p.update(size={"shortest_edge": 10 ** 6}), "shortest_edge is 1000000, outside"),
    ("preprocessor_config.json", lambda p: p.update(image_mean="grey"), "image_mean must be a list of 3 numbers"),
    ("preprocessor_config.json", lambda p: p.update(image_std=[0.2, float("nan"), 0.2]), "image_std must be a list"),
    ("config.json", lambda c: c["text_config"].update(rope_theta=float("inf")), "rope_theta is inf, expected a finite"),
    ("preprocessor_config.json", lambda p: p.update(resample="bicubic"), "resample is 'bicubic'"),
    ("tokenizer.json", lambda t: t.update(added_tokens=[1, 2]), "added_tokens entry '1' is not an object"),
    ("tokenizer.json", lambda t: t.update(added_tokens={"a": 1}), "added_tokens is dict, expected a list"),
    ("tokenizer.json", lambda t: t.update(model=["BPE"]), "model.type ['BPE'] is not supported"),
    ("tokenizer.json", lambda t: t["model"].update(merges=[1, 2]), "model.merges must be a list"),
    ("tokenizer_config.json", lambda t: t.update(chat_template=42), "chat_template is int, expected a string"),
    ("tokenizer_config.json", lambda t: t.update(eos_token="<|nowhere|>"), "eos_token '<|nowhere|>' is not in the vocabulary"),
])
def test_fields_of_the_wrong_type_or_size(tmp_path, fresh_checkpoint, file, change, needle):
    ckpt = fresh_checkpoint()
    edit(ckpt / file, change)
    assert_clean_failure(cli("convert", ckpt, "--out", tmp_path / "o"), needle, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_quantizer_threads_are_bounded(tmp_path, fresh_checkpoint):
    assert_clean_failure(cli("convert", fresh_checkpoint(), "--out", tmp_path / "o", "--threads", "100000"),
                         "--threads 100000: a whole number from 1 to 1024")


def test_an_added_token_repeating_a_vocabulary_text_is_refused(tmp_path, fresh_checkpoint):
    """llama.cpp would load the converted file and abort the whole process (SIGABRT)."""
    ckpt = fresh_checkpoint()
    vocab = json.loads((ckpt / "tokenizer.json").read_text())["model"]["vocab"]
    text = next(t for t in vocab if len(t) > 3 and t.isalpha())
    edit(ckpt / "tokenizer.json", lambda t: t["added_tokens"].append(
        {"id": 310, "content": text, "special": False, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False}))
    assert_clean_failure(cli("convert", ckpt, "--out", tmp_path / "o"), "tokenizer.json", repr(text),
                         f"ids {vocab[text]} and 310")


@pytest.mark.parametrize("make,needle", [
    (lambda p: (p / "config.json").unlink() or (p / "config.json").mkdir(), "config.json: is a directory"),
    (lambda p: (p / "config.json").unlink() or os.mkfifo(p / "config.json"), "config.json: is a FIFO"),
    (lambda p: (p / "model.safetensors").unlink() or os.mkfifo(p / "model.safetensors"), "model.safetensors: is a FIFO"),
    (lambda p: (p / "tokenizer.json").unlink() or (p / "tokenizer.json").symlink_to("/dev/zero"), "is a character device"),
    (lambda p: (p / "chat_template.jinja").write_bytes(b"{{ '\xff\xfe' }}"), "chat_template.jinja: not UTF-8"),
    (lambda p: (p / "config.json").write_text("[" * 100000 + "]" * 100000), "nested too deeply"),
    (lambda p: (p / "config.json").write_text('"just a string"'), "expected a JSON object, got str"),
])
def test_files_of_the_wrong_kind(tmp_path, fresh_checkpoint, make, needle):
    ckpt = fresh_checkpoint()
    make(ckpt)
    assert_clean_failure(cli("convert", ckpt, "--out", tmp_path / "o"), needle)


def test_a_safetensors_header_nested_too_deeply(tmp_path, fresh_checkpoint):
    ckpt = fresh_checkpoint()
    raw = b'{"a":' * 50000 + b"1" + b"}" * 50000
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    assert_clean_failure(cli("convert", ckpt, "--out", tmp_path / "o"), "model.safetensors", "nested too deeply")


@pytest.mark.parametrize("name", ["/etc/passwd.safetensors", "sub/model.safetensors", "..\\model.safetensors",
                                  ".hidden.safetensors", 17])
def test_index_entries_must_be_bare_file_names(tmp_path, fresh_checkpoint, name):
    ckpt = fresh_checkpoint(shards=2)
    index = ckpt / "model.safetensors.index.json"
    edit(index, lambda i: i["weight_map"].update({next(iter(i["weight_map"])): name}))
    assert_clean_failure(cli("convert", ckpt, "--out", tmp_path / "o"), "model.safetensors.index.json",
                         "leaves the checkpoint folder")


def test_a_template_that_never_ends_is_replaced_not_hung_on(tmp_path, fresh_checkpoint):
    forever = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    assert "steps" in problem(forever, "<image>")
    assert "cap" in problem("{{ 'x' * 10000000000 }}", "<image>")
    ckpt = fresh_checkpoint(template=forever)
    result = cli("convert", ckpt, "--out", tmp_path / "o", "--quant", "F16", "--json")
    assert result.exit_code == 0, result.output
    from gguf import GGUFReader
    stored = GGUFReader(tmp_path / "o" / "ckpt-F16.gguf").fields["tokenizer.chat_template"].contents()
    assert "range(99999)" not in stored and "<|im_start|>" in stored  # the built-in ChatML template


def test_templates_are_probed_with_system_and_several_turns():
    no_system = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
                 "{% for p in m['content'] %}{{ '<image>' if p.type == 'image' else p['text'] }}{% endfor %}{% endfor %}")
    assert problem(no_system, "<image>") == "no system"
    first_only = "<image>{{ messages[0]['content'][1]['text'] }}"
    assert "multi-turn" in problem(first_only, "<image>")


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json", "preprocessor_config.json"])
def test_a_number_past_pythons_digit_limit_is_one_line(tmp_path, fresh_checkpoint, file):
    """json.loads raises ValueError (not JSONDecodeError) for an integer of over 4300 digits."""
    ckpt = fresh_checkpoint()
    text = (ckpt / file).read_text()
    (ckpt / file).write_text(text[:-1].rstrip() + ', "huge": ' + "9" * 5000 + "}")
    assert_clean_failure(cli("convert", ckpt, "--out", tmp_path / "o"), f"{file}: not valid JSON", out=tmp_path / "o")
