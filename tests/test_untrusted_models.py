"""GGUF files that llama.cpp would abort, crash or misbehave on are refused by our checks first: one
line naming the file and the key or tensor, exit 1, in a child process (a crash would show as a
negative return code instead of failing quietly)."""

from __future__ import annotations

import json
import shutil

import pytest
from gguf import GGUFValueType as T
from hostile import cli_process, one_error_line, rewrite_gguf

from acestep_gguf import ModelFilesError, VisionChat
from acestep_gguf.runtime.model_files import check_file, read_fields

LM, MM = "tiny-llava-F16.gguf", "mmproj-tiny-llava-F16.gguf"


@pytest.fixture()
def pair(tmp_path, converted):
    """A private copy of a converted folder (F16 + mmproj F16) whose files a test may replace."""
    folder = tmp_path / "pair"
    folder.mkdir()
    for name in (LM, MM):
        shutil.copy(converted / name, folder / name)
    manifest = json.loads((converted / "manifest.json").read_text())
    manifest["files"] = [f for f in manifest["files"] if f["file"] in (LM, MM)]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def replace(folder, name, **edits):
    tmp = folder / (name + ".new")
    rewrite_gguf(folder / name, tmp, **edits)
    tmp.replace(folder / name)


def chat_on(folder, noise_image):
    return cli_process("chat", noise_image, "-m", folder, "-p", "What is this?", "--max-tokens", "2")


def test_a_good_pair_loads_and_answers(pair, noise_image):
    done = chat_on(pair, noise_image)
    assert done.returncode == 0 and done.stderr == "" and done.stdout.strip() != ""


def tokens_of(path) -> list[str]:
    from gguf import GGUFReader
    field = GGUFReader(path).fields["tokenizer.ggml.tokens"]
    return [bytes(field.parts[i]).decode() for i in field.data]


def test_repeated_token_text_is_refused_before_llama_cpp_aborts(pair, noise_image):
    tokens = tokens_of(pair / LM)
    tokens[300] = tokens[42]  # llama.cpp: GGML_ASSERT(id_to_token.size() == token_to_id.size()) -> SIGABRT
    replace(pair, LM, fields={"tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING)})
    one_error_line(chat_on(pair, noise_image), LM, f"token text {tokens[42]!r} at 42 and 300")


def test_missing_mmproj_tensor_is_refused_before_the_clip_loader_crashes(pair, noise_image):
    replace(pair, MM, drop_tensors=("v.blk.1.ln2.weight",))
    one_error_line(chat_on(pair, noise_image), MM, "tensor v.blk.1.ln2.weight is missing")
    info = cli_process("info", pair / MM)
    assert info.returncode == 0 and "check: failed: tensor v.blk.1.ln2.weight is missing" in info.stdout


def test_mis_shaped_tensor_is_refused(pair, noise_image):
    replace(pair, MM, reshape={"mm.0.bias": (8, 8)})
    one_error_line(chat_on(pair, noise_image), "mm.0.bias", "shape [8, 8]", "[64]")


@pytest.mark.parametrize("file,key,value,needle", [
    (LM, "qwen2.block_count", (1 << 40, T.UINT64, None), "qwen2.block_count is UINT64, llama.cpp needs UINT32"),
    (LM, "qwen2.block_count", (100000, T.UINT32, None), "qwen2.block_count is 100000, outside 1..1024"),
    (LM, "qwen2.attention.head_count", (0, T.UINT32, None), "head_count is 0, outside"),
    (LM, "qwen2.attention.head_count_kv", (3, T.UINT32, None), "not a multiple of head_count_kv"),
    (LM, "tokenizer.ggml.token_type", ([1] * 10, T.ARRAY, T.INT32), "token_type has 10 entries for 320 tokens"),
    (LM, "tokenizer.ggml.token_type", ([1] * 320, T.ARRAY, T.UINT8), "is ARRAY of UINT8, llama.cpp needs ARRAY of INT32"),
    (LM, "tokenizer.ggml.eos_token_id", (5000, T.UINT32, None), "eos_token_id 5000 is not a token id"),
    (MM, "clip.vision.image_size", ("56", T.STRING, None), "clip.vision.image_size is STRING, llama.cpp needs UINT32"),
    (MM, "clip.vision.patch_size", (0, T.UINT32, None), "clip.vision.patch_size is 0, outside"),
    (MM, "clip.vision.image_mean", ([0.5], T.ARRAY, T.FLOAT32), "clip.vision.image_mean is 1, outside 3..3"),
    (MM, "clip.projector_type", ("resampler", T.STRING, None), "clip.projector_type 'resampler' is not supported (supported: mlp, pixtral)"),
    (MM, "clip.vision.feature_layer", ([9], T.ARRAY, T.INT32), "feature_layer is outside the written layers"),
])
def test_odd_metadata_is_one_line(pair, noise_image, file, key, value, needle):
    replace(pair, file, fields={key: value})
    one_error_line(chat_on(pair, noise_image), file, needle)


@pytest.mark.parametrize("file,key", [(LM, "qwen2.block_count"), (LM, "tokenizer.chat_template"),
                                      (MM, "clip.vision.image_size"), (MM, "clip.vision.projection_dim")])
def test_missing_keys_are_named(pair, noise_image, file, key):
    replace(pair, file, drop_fields=(key,))
    one_error_line(chat_on(pair, noise_image), file, f"{key} is missing")


def test_planner_and_info_on_odd_files(pair):
    replace(pair, LM, fields={"qwen2.block_count": (1 << 40, T.UINT64, None)})
    one_error_line(cli_process("plan", pair / LM, "--vram", "4GiB"), "qwen2.block_count")
    one_error_line(cli_process("plan", pair / MM), "this is an mmproj (clip) file")
    info = cli_process("info", pair / LM, "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["check"].startswith("failed: qwen2.block_count")


def test_a_template_that_cannot_render_is_refused_at_load(pair, noise_image):
    loop = "{% for i in range(99999) %}{% for j in range(99999) %}{{ '' }}{% endfor %}{% endfor %}"
    replace(pair, LM, fields={"tokenizer.chat_template": (loop, T.STRING, None)})
    one_error_line(chat_on(pair, noise_image), "chat template cannot render", "steps")


def test_a_template_refusing_system_messages_fails_only_with_a_system_prompt(pair, noise_image):
    template = read_fields(pair / LM, "language model")["tokenizer.chat_template"]
    strict = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
              + template)
    replace(pair, LM, fields={"tokenizer.chat_template": (strict, T.STRING, None)})
    assert chat_on(pair, noise_image).returncode == 0
    done = cli_process("chat", noise_image, "-m", pair, "-p", "Hi", "--system", "Be brief.", "--max-tokens", "2")
    one_error_line(done, "System role not supported", "leave out the system prompt")


def test_templates_see_the_real_eos_text(pair, noise_image):
    template = read_fields(pair / LM, "language model")["tokenizer.chat_template"]
    needs_eos = "{% if eos_token == '' %}{{ raise_exception('eos_token is empty') }}{% endif %}" + template
    replace(pair, LM, fields={"tokenizer.chat_template": (needs_eos, T.STRING, None)})
    with VisionChat.load(pair, n_ctx=512) as chat:
        chat.ask("Hello?", max_tokens=2)
        assert chat.ask("Again?", max_tokens=2) is not None and chat.last_turn.reused_positions > 0


def test_check_file_accepts_every_file_we_write(converted):
    for name in (LM, "tiny-llava-Q8_0.gguf"):
        check_file(read_fields(converted / name, "language model"), converted / name, "language")
    check_file(read_fields(converted / MM, "mmproj"), converted / MM, "vision")
    with pytest.raises(ModelFilesError, match="not an mmproj file"):
        check_file(read_fields(converted / LM, "language model"), converted / LM, "vision")


@pytest.mark.parametrize("change,needle", [
    (lambda m: m["files"][0].update(file="../../elsewhere.gguf"), "'../../elsewhere.gguf' is not a plain file name"),
    (lambda m: m["files"][0].update(bytes="many"), "lacks file, role, type, bytes or sha256"),
    (lambda m: m.update(files={"a": 1}), "not a manifest written by acestep-gguf"),
    (lambda m: m.clear(), "not a manifest written by acestep-gguf"),
])
def test_a_tampered_manifest_is_one_line(pair, noise_image, change, needle):
    manifest = json.loads((pair / "manifest.json").read_text())
    change(manifest)
    (pair / "manifest.json").write_text(json.dumps(manifest))
    one_error_line(chat_on(pair, noise_image), "manifest.json", needle)


def test_a_manifest_that_is_a_fifo_is_refused_not_waited_on(pair, noise_image):
    import os
    (pair / "manifest.json").unlink()
    os.mkfifo(pair / "manifest.json")
    one_error_line(chat_on(pair, noise_image), "manifest.json: is a FIFO")
