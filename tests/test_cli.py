"""The command line as a user types it: convert, chat (one-shot, JSON, interactive), caption, info."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from acestep_gguf.cli import app

runner = CliRunner()


def cli(*args, input=None, env=None):
    return runner.invoke(app, [str(a) for a in args], input=input, env=env)


def test_convert_json_prints_the_manifest_and_a_rerun_reuses_files(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    first = cli("convert", tiny_checkpoint, "--out", out, "--quant", "Q8_0", "--mmproj-quant", "Q8_0", "--json")
    assert first.exit_code == 0, first.output
    manifest = json.loads(first.stdout)
    assert manifest["name"] == "tiny-llava" and manifest["source"]["architecture"] == "LlavaForConditionalGeneration"
    assert [(f["file"], f["role"], f["type"]) for f in manifest["files"]] == [
        ("tiny-llava-Q8_0.gguf", "language", "Q8_0"), ("mmproj-tiny-llava-Q8_0.gguf", "vision", "Q8_0")]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    stamp = (out / "tiny-llava-Q8_0.gguf").stat().st_mtime_ns
    again = cli("convert", tiny_checkpoint, "--out", out, "--quant", "Q8_0", "--mmproj-quant", "Q8_0")
    assert again.exit_code == 0 and "kept (unchanged) tiny-llava-Q8_0.gguf" in again.stderr
    assert (out / "tiny-llava-Q8_0.gguf").stat().st_mtime_ns == stamp
    forced = cli("convert", tiny_checkpoint, "--out", out, "--quant", "Q8_0", "--mmproj-quant", "Q8_0", "--force")
    assert forced.exit_code == 0 and "wrote tiny-llava-Q8_0.gguf" in forced.stderr
    assert (out / "tiny-llava-Q8_0.gguf").stat().st_mtime_ns != stamp
    quiet = cli("convert", tiny_checkpoint, "--out", out, "--quant", "Q8_0,F16", "--mmproj-quant", "Q8_0", "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert {f["type"] for f in json.loads((out / "manifest.json").read_text())["files"]} == {"Q8_0", "F16"}


def test_convert_from_the_offline_hugging_face_cache(tmp_path, tiny_checkpoint, monkeypatch):
    """A repo id resolves through huggingface-hub's cache with HF_HUB_OFFLINE=1."""
    hub = tmp_path / "hub"
    snapshot = hub / "models--acme--tiny-llava" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in tiny_checkpoint.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (hub / "models--acme--tiny-llava" / "refs").mkdir()
    (hub / "models--acme--tiny-llava" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = cli("convert", "acme/tiny-llava", "--out", tmp_path / "o", "--quant", "Q8_0", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["name"] == "tiny-llava" and manifest["source"]["repo_id"] == "acme/tiny-llava"
    missing = cli("convert", "acme/not-cached", "--out", tmp_path / "o2")
    assert missing.exit_code == 1 and "not in the local Hugging Face cache" in missing.stderr


def test_chat_one_shot_streams_and_json(converted, noise_image):
    streamed = cli("chat", noise_image, "-m", converted, "-p", "What is in this picture?", "--max-tokens", "6")
    assert streamed.exit_code == 0, streamed.output
    result = cli("chat", noise_image, "-m", converted, "-p", "What is in this picture?", "--max-tokens", "6", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"text", "model", "quant", "usage", "timings"}
    assert data["quant"] == "Q8_0" and data["usage"]["images_encoded"] == 1
    assert data["usage"]["completion_tokens"] <= 6 and data["usage"]["prompt_tokens"] > 16
    assert streamed.stdout.rstrip("\n") == data["text"]  # the same greedy answer either way


def test_chat_interactive_script(converted, noise_image, second_image):
    script = "\n".join(["What is in this picture?", f"/image {second_image}", "And now?", "/reset", "Hello?",
                        "/image /nonexistent.png", "Broken?", "After the error?", "/quit", "never read"]) + "\n"
    result = cli("chat", noise_image, "-m", converted, "--max-tokens", "4", input=script)
    assert result.exit_code == 0, result.output
    assert "conversation reset" in result.stderr
    assert "no such image file" in result.stderr  # a bad image ends that turn, not the session
    replies = [line for line in result.stdout.split("\n")]
    assert len(replies) >= 4


def test_chat_ends_at_end_of_input(converted):
    result = cli("chat", "-m", converted, "--max-tokens", "2", input="Hi\n")
    assert result.exit_code == 0


def test_chat_without_a_model_says_what_to_do(tmp_path, noise_image):
    result = cli("chat", noise_image, "-p", "hi", env={"ACESTEP_GGUF_CACHE": str(tmp_path / "cache"),
                                                       "ACESTEP_GGUF_MODEL": ""})
    assert result.exit_code == 1 and "acestep-gguf demo" in result.stderr


def test_chat_bad_image_is_one_clear_line(converted, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    result = cli("chat", bad, "-m", converted, "-p", "What is this?")
    assert result.exit_code == 1 and result.stderr.strip().startswith("error:") and "not a JPEG, PNG or WEBP" in result.stderr


def test_caption_batch_with_a_bad_image_and_resume(converted, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40 + i * 10, 60, 3), np.uint8)).save(folder / f"img{i}.png")
    (folder / "img1b.jpg").write_bytes(b"this is not a jpeg")
    out = tmp_path / "captions.jsonl"
    first = cli("caption", folder, "-p", "Describe this image.", "--out", out, "-m", converted, "--max-tokens", "4")
    assert first.exit_code == 0, first.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"].rsplit("/", 1)[1] for r in records] == ["img0.png", "img1.png", "img1b.jpg", "img2.png", "img3.png"]
    assert "error" in records[2] and "not a JPEG" in records[2]["error"]
    assert all("text" in r for i, r in enumerate(records) if i != 2)
    assert "4 captioned, 0 already done, 1 failed" in first.stderr
    Image.fromarray(rng.integers(0, 256, (50, 50, 3), np.uint8)).save(folder / "img4.png")
    second = cli("caption", folder, "--out", out, "-m", converted, "--max-tokens", "4")
    assert second.exit_code == 0 and "1 captioned, 4 already done, 1 failed" in second.stderr
    assert len(out.read_text().splitlines()) == 7  # the bad image is retried and recorded again


def test_info_describes_both_files(converted):
    lm = cli("info", converted / "tiny-llava-Q8_0.gguf", "--json")
    assert lm.exit_code == 0
    facts = json.loads(lm.stdout)
    assert facts["architecture"] == "qwen2" and facts["file_type"] == "Q8_0" and facts["block_count"] == 2
    assert "gpt2 / qwen2" in facts["tokenizer"] and "<|im_start|>" in facts["chat_template"]
    mm = cli("info", converted / "mmproj-tiny-llava-F16.gguf")
    assert mm.exit_code == 0 and "projector_type: mlp" in mm.stdout and "image_size: 56" in mm.stdout
    missing = cli("info", converted / "nope.gguf")
    assert missing.exit_code == 1 and "no such GGUF file" in missing.stderr


def test_python_dash_m_entry_point(converted):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "acestep_gguf", "info", str(converted / "tiny-llava-F16.gguf")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "architecture: qwen2" in done.stdout and done.stderr == ""


def test_llama_cpp_stays_silent_unless_verbose(converted, noise_image):
    """Only the answer reaches the terminal: no llama.cpp / mtmd log lines on stdout or stderr."""
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "acestep_gguf", "chat", str(noise_image), "-m", str(converted), "-p", "Hi", "--max-tokens", "3"]
    quiet = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == "" and len(quiet.stdout.splitlines()) <= 2
    loud = subprocess.run(cmd + ["--verbose"], capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0 and "llama_model_loader" in loud.stderr and "clip_model_loader" in loud.stderr
