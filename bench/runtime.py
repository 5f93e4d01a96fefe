"""Runtime benchmark: a two-turn conversation about one image, with VisionChat and with
llama-cpp-python's own MTMDChatHandler, on the same GGUF files. Reports time to first token (first
and follow-up turn) and decode tokens/s; medians over --reps runs.

The model is generated (random weights) so that the image dominates as it does for ACE-Step 1.5: a
CLIP ViT-L/14-sized tower at 336 px (577 positions, 24 layers, width 1024) and a small Qwen2.

    python bench/runtime.py --reps 3
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from builders import build_tokenizer, save_checkpoint  # noqa: E402
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config  # noqa: E402

from acestep_gguf import VisionChat, convert  # noqa: E402

FIRST, FOLLOW = "Describe this image in detail.", "And what colour is the largest shape?"


def build(folder: Path) -> Path:
    tok = build_tokenizer()
    text = Qwen2Config(vocab_size=320, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                       eos_token_id=tok.token_to_id("<|im_end|>"))
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, hidden_act="quick_gelu")
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=tok.token_to_id("<image>"),
                         vision_feature_layer=-2, projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random weights, but readable output: only letters can win, never end-of-text
        letters = [tok.token_to_id(c) for c in "abcdefghijklmnopqrstuvwxyz"]
        keep = model.lm_head.weight[letters].clone() * 5
        model.lm_head.weight.zero_()
        model.lm_head.weight[letters] = keep
    ckpt = save_checkpoint(model, tok, folder / "ckpt", dtype=torch.bfloat16)
    convert(ckpt, out=folder / "gguf", quant="Q8_0", mmproj_quant="F16", name="bench")
    return folder / "gguf"


def picture() -> tuple[Image.Image, str]:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (336, 336, 3), np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return image, "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ours(folder: Path, image, tokens: int, threads: int) -> dict:
    with VisionChat.load(folder, n_ctx=2048, n_threads=threads) as chat:
        out = {}
        for label, prompt, images in (("first", FIRST, [image]), ("follow", FOLLOW, [])):
            started = time.perf_counter()
            first_at, n = None, 0
            for _ in chat.stream(prompt, images, max_tokens=tokens):
                first_at = first_at or time.perf_counter()
                n += 1
            t = chat.last_turn
            out[label] = {"ttft": t.time_to_first_token_s, "tps": t.decode_tokens_per_s,
                          "evaluated": t.evaluated_positions, "wall": time.perf_counter() - started}
        return out


def handler(folder: Path, uri: str, tokens: int, threads: int) -> dict:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler
    llm = Llama(str(folder / "bench-Q8_0.gguf"), chat_handler=MTMDChatHandler(
        clip_model_path=str(folder / "mmproj-bench-F16.gguf"), verbose=False), n_ctx=2048, n_threads=threads,
        n_batch=2048, verbose=False)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                             {"type": "text", "text": FIRST}]}]
    out = {}
    try:
        for label in ("first", "follow"):
            started = time.perf_counter()
            stamps, text = [], ""
            for chunk in llm.create_chat_completion(messages=messages, temperature=0.0, repeat_penalty=1.0,
                                                    max_tokens=tokens, stream=True):
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    stamps.append(time.perf_counter())
                    text += piece
            out[label] = {"ttft": stamps[0] - started, "wall": time.perf_counter() - started,
                          "tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0}
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": FOLLOW}]
    finally:
        llm.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    folder = build(Path(tempfile.mkdtemp()))
    image, uri = picture()
    runs = {"VisionChat": [], "MTMDChatHandler": []}
    for _ in range(args.reps):
        runs["VisionChat"].append(ours(folder, image, args.tokens, args.threads))
        runs["MTMDChatHandler"].append(handler(folder, uri, args.tokens, args.threads))
    print(f"medians of {args.reps} runs, {args.threads} threads, {args.tokens} tokens per turn\n")
    print("| runtime | first turn TTFT s | follow-up TTFT s | follow-up / first | decode tok/s (first turn) |")
    print("|---|---|---|---|---|")
    for name, results in runs.items():
        med = {k: statistics.median(r[t][k2] for r in results) for k, (t, k2) in
               {"f": ("first", "ttft"), "u": ("follow", "ttft"), "d": ("first", "tps")}.items()}
        print(f"| {name} | {med['f']:.3f} | {med['u']:.3f} | {med['u'] / med['f']:.1%} | {med['d']:.1f} |")
    evaluated = runs["VisionChat"][0]["follow"]["evaluated"]
    print(f"\nVisionChat follow-up turn evaluated {evaluated} new positions (the image is not re-encoded).")


if __name__ == "__main__":
    main()
