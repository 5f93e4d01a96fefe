"""The KV cache in F16, Q8_0 or Q4_0 (`--cache-type-k/-v`, `VisionChat.load(cache_type_k=..)`) in every
command: the demo model gives the same answers with a quantized cache, follow-ups still reuse it,
the planner counts its bytes per type, and server states of one type are never loaded by another."""

from __future__ import annotations

import json
import random

import pytest
from hostile import cli_process, one_error_line
from test_server import Server, user

from acestep_gguf import VisionChat, convert
from acestep_gguf.demo import DEMO_CHECKPOINT, demo_question
from acestep_gguf.runtime.kv_cache_types import CacheTypes

KIB = 1024


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo-gguf"
    convert(DEMO_CHECKPOINT, out=out, quant="Q8_0", name="acestep-demo")
    return out


def answers(folder, k, v, asked) -> tuple[list[str], int]:
    with VisionChat.load(folder, quant="Q8_0", n_ctx=1024, cache_type_k=k, cache_type_v=v) as chat:
        out = []
        for picture, question, _ in asked:
            chat.reset()
            out.append(chat.ask(question, images=[picture], max_tokens=16).strip())
        chat.ask("And the colour?", max_tokens=8)  # a follow-up: the picture is not encoded again
        assert chat.last_turn.images_encoded == 0
        return out, chat.last_turn.reused_positions


@pytest.mark.parametrize("k,v", [("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16"), ("f16", "q4_0")])
def test_a_quantized_cache_gives_the_same_answers(demo, k, v):
    asked = [demo_question(random.Random(seed)) for seed in range(16)]
    reference, _ = answers(demo, "f16", "f16", asked)
    got, reused = answers(demo, k, v, asked)
    assert got == reference and sum(a == e for a, (_, _, e) in zip(got, asked)) >= 15
    assert reused > 64  # the picture's positions and the question came from the cache


def test_bad_types_and_head_sizes_are_one_line(demo, converted, noise_image):
    one_error_line(cli_process("chat", noise_image, "-m", demo, "-p", "x", "--cache-type-v", "q5_1"),
                   "--cache-type-v 'q5_1': choose f16, q8_0, q4_0")
    # the tiny test model's heads are 16 wide: a quantized row of 32 cannot hold one
    one_error_line(cli_process("chat", noise_image, "-m", converted, "-p", "x", "--cache-type-k", "q8_0"),
                   "multiple of 32", "is 16")


def test_the_planner_counts_kv_bytes_per_type():
    """Qwen2.5-32B (64 layers, 8 KV heads of 128): 256 KiB per position in F16, 136 in Q8_0, 72 in Q4_0."""
    for k, per_token in (("f16", 256), ("q8_0", 136), ("q4_0", 72)):
        done = cli_process("plan", "--preset", "ace-step-1.5", "--vram", "12GiB", "--ctx", "4096", "--cache-type-k", k,
                           "--cache-type-v", k, "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["kv_cache_total_bytes"] == per_token * KIB * 4096
    assert CacheTypes.parse("Q8_0", None) == CacheTypes("q8_0", "f16") and CacheTypes("q8_0", "q8_0").flash_attn


def test_caption_with_a_quantized_cache(demo, tmp_path):
    picture, question, expected = demo_question(random.Random(3))
    picture.save(tmp_path / "a.png")
    done = cli_process("caption", tmp_path / "a.png", "-p", question, "--out", tmp_path / "c.jsonl", "-m", demo,
                       "--cache-type-k", "q8_0", "--cache-type-v", "q8_0", "--max-tokens", "16")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "c.jsonl").read_text())["text"].strip() == expected


def test_server_states_of_another_cache_type_are_never_loaded(demo, tmp_path, noise_image):
    cache = tmp_path / "states"
    for types in (("f16", "f16"), ("q8_0", "q8_0")):
        s = Server(demo, "--cache-type-k", types[0], "--cache-type-v", types[1], cache_dir=cache)
        try:
            reply = s.client().chat.completions.create(model="acestep-demo", messages=[user("What shape is this?",
                                                                                            noise_image)], max_tokens=6)
            assert reply.usage.prompt_tokens_details.cached_tokens == 0  # the other type's state is not this one's
        finally:
            s.stop()
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2
    again = Server(demo, "--cache-type-k", "q8_0", "--cache-type-v", "q8_0", cache_dir=cache)
    try:
        reply = again.client().chat.completions.create(model="acestep-demo", messages=[user("What shape is this?",
                                                                                            noise_image)], max_tokens=6)
        assert reply.usage.prompt_tokens_details.cached_tokens > 64  # its own, from disk
    finally:
        again.stop()
