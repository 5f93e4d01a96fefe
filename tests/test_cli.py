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


def test_a_repo_id_not_in_the_cache_is_one_line_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
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


def test_chat_interactive_script(endless, noise_image, second_image):
    script = "\n".join(["What is in this picture?", "/help", f"/image {second_image}", "/images", "And now?", "/reset",
                        "Hello?", "/image /nonexistent.png", "/frobnicate", "//slash message", "/quit",
                        "never read"]) + "\n"
    result = cli("chat", noise_image, "-m", endless, "--max-tokens", "4", input=script)
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "/image PATH   attach an image" in err  # /help
    assert f"attached {second_image} (sent with your next message)" in err and f"{second_image}\n" in err
    assert "conversation reset" in err
    assert "error: /nonexistent.png: no such image file" in err  # refused at once, not after the next message
    assert "error: unknown command /frobnicate" in err
    replies = [line for line in result.stdout.split("\n") if line]
    assert len(replies) == 4  # four messages were sent (the // one too); commands produced no reply


def test_chat_ends_at_end_of_input(endless):
    result = cli("chat", "-m", endless, "--max-tokens", "3", input="Hi\n")
    assert result.exit_code == 0 and len(result.stdout.strip()) > 0 and result.stderr == ""


def test_chat_without_a_model_uses_the_demo_and_converts_a_quant_on_demand(tmp_path, noise_image):
    env = {"ACESTEP_GGUF_CACHE": str(tmp_path / "cache"), "ACESTEP_GGUF_MODEL": ""}
    first = cli("chat", noise_image, "-p", "What shape is this?", "--max-tokens", "8", "--json", env=env)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["quant"] == "Q8_0"  # the demo, converted on first use
    q4 = cli("chat", noise_image, "-p", "What shape is this?", "--quant", "Q4_K_M", "--max-tokens", "8", "--json",
             env=env)
    assert q4.exit_code == 0, q4.output
    assert json.loads(q4.stdout)["quant"] == "Q4_K_M"
    manifest = json.loads((tmp_path / "cache" / "acestep-demo-gguf" / "manifest.json").read_text())
    assert {f["type"] for f in manifest["files"] if f["role"] == "language"} == {"Q8_0", "Q4_K_M"}


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
    assert second.exit_code == 0 and "1 captioned, 5 already done, 0 failed" in second.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 6 and sum("error" in json.loads(ln) for ln in lines) == 1  # the bad image once


def test_caption_retry_failed_replaces_the_error_line(converted, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    Image.new("RGB", (60, 60), (200, 10, 10)).save(folder / "good.png")
    (folder / "bad.png").write_bytes(b"not yet an image")
    out = tmp_path / "captions.jsonl"
    assert cli("caption", folder, "--out", out, "-m", converted, "--max-tokens", "3").exit_code == 0
    Image.new("RGB", (60, 60), (10, 200, 10)).save(folder / "bad.png")  # fixed by the user
    again = cli("caption", folder, "--out", out, "-m", converted, "--max-tokens", "3", "--retry-failed")
    assert again.exit_code == 0 and "1 captioned, 1 already done, 0 failed" in again.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image"].rsplit("/", 1)[1] for r in records) == ["bad.png", "good.png"]
    assert all("text" in r for r in records)


def test_caption_repairs_a_torn_last_line(converted, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (60, 60), (80 * i, 40, 40)).save(folder / f"p{i}.png")
    out = tmp_path / "captions.jsonl"
    assert cli("caption", folder, "--out", out, "-m", converted, "--max-tokens", "3").exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:17])  # killed while writing the third record
    again = cli("caption", folder, "--out", out, "-m", converted, "--max-tokens", "3")
    assert again.exit_code == 0 and "1 captioned, 2 already done" in again.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]  # every line parses
    assert sorted(r["image"].rsplit("/", 1)[1] for r in records) == ["p0.png", "p1.png", "p2.png"]


def test_info_describes_both_files(converted):
    lm = cli("info", converted / "tiny-llava-Q8_0.gguf", "--json")
    assert lm.exit_code == 0
    facts = json.loads(lm.stdout)
    assert facts["architecture"] == "qwen2" and facts["file_type"] == "Q8_0" and facts["block_count"] == 2
    assert "gpt2 / qwen2" in facts["tokenizer"] and "<|im_start|>" in facts["chat_template"]
    mm = cli("info", converted / "mmproj-tiny-llava-F16.gguf")
    assert mm.exit_code == 0 and "projector_type: mlp" in mm.stdout and "image_size: 56" in mm.stdout
    assert "vision_tower: clip" in mm.stdout and "image_tokens_max: 16" in mm.stdout
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


def test_caption_output_that_is_not_a_regular_file(converted, tmp_path, noise_image):
    import os
    fifo = tmp_path / "captions.jsonl"
    os.mkfifo(fifo)
    result = cli("caption", noise_image, "--out", fifo, "-m", converted)
    assert result.exit_code == 1 and result.stderr.strip() == f"error: {fifo}: is a FIFO, expected a JSON-lines file"
    result = cli("caption", noise_image, "--out", tmp_path, "-m", converted)
    assert result.exit_code == 1 and "is a directory" in result.stderr
