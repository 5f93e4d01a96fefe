"""Ctrl-C as a user presses it: a real SIGINT to the command in a child process, mid-generation and
mid-quantization. Never a traceback or "Exception ignored" (an exception raised inside a llama.cpp
callback), the right exit code, nothing half-written."""

from __future__ import annotations

import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest
from builders import build_model, save_checkpoint, tiny_config

from acestep_gguf import VisionChat, convert

CLI = [sys.executable, "-m", "acestep_gguf"]


def start(*args, stdin=None):
    return subprocess.Popen([*CLI, *map(str, args)], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def no_python_noise(stderr: str) -> None:
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]


@pytest.mark.parametrize("signals", [1, 10])
def test_one_shot_chat_prints_what_it_had_and_exits_130(endless, noise_image, signals):
    proc = start("chat", noise_image, "-m", endless, "-p", "Describe this image.", "--max-tokens", "100000",
                 "--ctx", "16384")
    first = proc.stdout.read(1)  # generation is under way
    for _ in range(signals):
        proc.send_signal(signal.SIGINT)
    rest, stderr = proc.communicate(timeout=60)
    stderr = stderr.decode()
    assert proc.returncode == 130, stderr
    assert len(first + rest) > 1 and (first + rest).endswith(b"\n")  # the partial reply, on its own line
    assert stderr.strip().splitlines() == ["interrupted"]
    no_python_noise(stderr)


def test_interactive_chat_returns_to_the_prompt(endless):
    proc = start("chat", "-m", endless, "--max-tokens", "100000", "--ctx", "16384", stdin=subprocess.PIPE)
    proc.stdin.write(b"Tell me a long story.\n")
    proc.stdin.flush()
    proc.stdout.read(1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.stdin.write(b"/help\n/quit\n")
    proc.stdin.flush()
    _, stderr = proc.communicate(timeout=60)
    stderr = stderr.decode()
    assert proc.returncode == 0, stderr
    assert "(reply stopped)" in stderr and "/image PATH" in stderr  # back at the prompt, /help answered
    no_python_noise(stderr)


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory, tokenizer):
    """Wide enough (38M parameters) that Q4_K_M on one thread takes seconds: time to press Ctrl-C."""
    config = tiny_config(tokenizer, hidden=768, text_layers=4)
    config.text_config.intermediate_size = 3072
    return save_checkpoint(build_model(config), tokenizer, tmp_path_factory.mktemp("slow") / "slow",
                           dtype=__import__("torch").float16)


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def wait_for_partial(proc, out) -> list[str]:
    """Until the one-pass writer has started its output (a *.partial file in the folder)."""
    deadline = time.time() + 60
    while not list(out.glob("*.gguf.partial")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    return []


def wait_for_llama_quantize(proc, out) -> list[str]:
    lines = []
    for raw in proc.stderr:  # wait until llama.cpp's quantizer reports its first tensors
        lines.append(raw.decode(errors="replace"))
        if "[   3/" in lines[-1]:
            break
    return lines


@pytest.mark.parametrize("route,wait", [([], wait_for_partial), (["--via-llama-quantize"], wait_for_llama_quantize)])
def test_ctrl_c_during_quantization(tmp_path, slow_checkpoint, route, wait):
    out = tmp_path / "out"
    convert(slow_checkpoint, out=out, quant="F16")  # an earlier output that must survive
    before = digests(out)
    proc = start("convert", slow_checkpoint, "--out", out, "--quant", "Q4_K_M", "--threads", "1", "--verbose", *route)
    lines = wait(proc, out)
    assert proc.poll() is None  # still writing when the signals come
    for _ in range(10):
        proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    stderr = "".join(lines) + rest.decode(errors="replace")
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.rstrip().endswith("interrupted")
    no_python_noise(stderr)
    assert digests(out) == before  # the F16 file and manifest untouched, no *.partial left
    done = subprocess.run([*CLI, "convert", str(slow_checkpoint), "--out", str(out), "--quant", "F16"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "kept (unchanged)" in done.stderr


def test_sigint_in_the_main_thread_of_a_host_app(endless, capfd):
    """Library use: Ctrl-C during ask() cancels the generation and raises KeyboardInterrupt once
    llama.cpp has returned — never inside its abort callback."""
    with VisionChat.load(endless, n_ctx=16384) as chat:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            chat.ask("Tell me a long story.", max_tokens=100000)
        timer.join()
        assert chat.last_turn.finish_reason == "cancelled" and chat.last_turn.completion_tokens > 0
        chat.ask("Still working?", max_tokens=3)
        assert (chat.last_turn.completion_tokens, chat.last_turn.finish_reason) == (3, "length")
    assert "Exception ignored" not in capfd.readouterr().err


@pytest.mark.parametrize("delay", [0.25, 0.4, 0.6, 0.9])
def test_an_early_ctrl_c_is_never_lost_or_a_traceback(endless, noise_image, delay):
    """Ctrl-C while the command is still importing llama.cpp, loading the model or encoding the image:
    exit 130, one line, and the answer does not run on."""
    # the console script pip installed beside this Python: a version manager's shim on PATH (pyenv's is
    # a bash script) could be the one interrupted, exiting 130 before our code runs at all
    script = pathlib.Path(sys.executable).parent / "acestep-gguf"
    proc = subprocess.Popen([str(script), "chat", str(noise_image), "-m", str(endless), "-p", "Describe it.",
                             "--max-tokens", "100000", "--ctx", "16384"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    stderr = stderr.decode()
    assert proc.returncode == 130, stderr[-2000:]
    # "interrupted", or nothing at all when the signal came while Python itself was still starting
    # (CPython then exits 130 on its own, before any code of ours runs)
    assert stderr.strip().splitlines() in ([], ["interrupted"]), stderr[-2000:]
    no_python_noise(stderr)
