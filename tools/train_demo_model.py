"""Train the bundled demo model: ACE-Step 1.5's layout (LlavaForConditionalGeneration: Qwen2 language
model + CLIP ViT with 14-pixel patches + 2-layer GELU MLP projector, ChatML template), scaled down
until it trains on 2 CPU cores, on the shapes task in acestep_gguf.shapes.

    python tools/train_demo_model.py --out acestep_gguf/demo_model            # the shipped model
    python tools/train_demo_model.py --out /tmp/smoke --steps 3 --no-eval     # smoke test

Dev dependencies only (torch, transformers, tokenizers, safetensors). Deterministic from --seed."""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from acestep_gguf.convert.plan import canonical_name  # noqa: E402
from acestep_gguf.convert.tokenizer import QWEN2_SPLIT  # noqa: E402
from acestep_gguf.runtime.images import PixelRecipe, prepare  # noqa: E402
from acestep_gguf.shapes import BACKGROUNDS, COLOURS, NUMBERS, QUESTIONS, SHAPES, sample  # noqa: E402

IMAGE_SIZE, PATCH = 84, 14
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer(vocab_size: int = 420) -> Tokenizer:
    words = [q for qs in QUESTIONS.values() for q in qs]
    words += [f"{n.capitalize()} {c} {s}s on a {b} background." for n in NUMBERS[1:] for c in COLOURS for s in SHAPES
              for b in BACKGROUNDS]
    words += [f"A {s}. {c.capitalize()}. {n.capitalize()}." for s in SHAPES for c in COLOURS for n in NUMBERS]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(words * 5, trainer)
    return tok


def build_config(tok: Tokenizer) -> LlavaConfig:
    text = Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
                       rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=tok.token_to_id("<|im_end|>"))
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="gelu", layer_norm_eps=1e-5)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=tok.token_to_id("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      image_seq_length=N_IMAGE_TOKENS, tie_word_embeddings=False)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg


def pixels(image) -> torch.Tensor:
    """Exactly the runtime's pixel preparation (shortest edge, centre crop), then CLIP normalisation."""
    prepared = prepare(image, PixelRecipe(IMAGE_SIZE, PATCH, IMAGE_SIZE))
    x = np.frombuffer(prepared.rgb, np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32) / 255.0
    return torch.from_numpy(((x - MEAN) / STD).transpose(2, 0, 1).astype(np.float32))


def prompt_ids(tok: Tokenizer, question: str) -> list[int]:
    text = f"<|im_start|>user\n<image>{question}<|im_end|>\n<|im_start|>assistant\n"
    image = tok.token_to_id("<image>")
    ids = []
    for i in tok.encode(text).ids:
        ids += [image] * N_IMAGE_TOKENS if i == image else [i]
    return ids


def batch(tok: Tokenizer, rng: random.Random, size: int):
    end = tok.token_to_id("<|im_end|>")
    rows, labels, pix = [], [], []
    for _ in range(size):
        image, question, answer, _ = sample(rng, max_short=168)
        p = prompt_ids(tok, question)
        a = tok.encode(answer).ids + [end]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
        pix.append(pixels(image))
    width = max(len(r) for r in rows)
    pad = tok.token_to_id("<|endoftext|>")
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, lab, mask, torch.stack(pix)


@torch.no_grad()
def answer(model, tok: Tokenizer, image, question: str, max_new: int = 16) -> str:
    """Greedy decoding with the PyTorch model: the reference the GGUF files are compared with."""
    ids = torch.tensor([prompt_ids(tok, question)])
    end = tok.token_to_id("<|im_end|>")
    out = model.generate(input_ids=ids, pixel_values=pixels(image)[None], max_new_tokens=max_new, do_sample=False,
                         eos_token_id=end, pad_token_id=end)
    return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip()


def save(model, tok: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16).contiguous().clone() for k, v in model.state_dict().items()}
    rename = [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
              ("model.vision_tower.", "vision_tower.vision_model."), ("model.multi_modal_projector.", "multi_modal_projector.")]
    named = {canonical_name(k, rename) or k: v for k, v in state.items()}
    save_file(named, out / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "add_bos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE}, indent=1))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": IMAGE_SIZE},
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_center_crop": True, "resample": 3,
        "do_normalize": True, "image_mean": MEAN, "image_std": STD}, indent=1))
    for junk in ("generation_config.json",):
        (out / junk).unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=4400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--eval", type=int, default=120, help="held-out pictures for the final check")
    ap.add_argument("--no-eval", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    rng = random.Random(args.seed)
    tok = build_tokenizer()
    model = LlavaForConditionalGeneration(build_config(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    started = time.time()
    model.train()
    for step in range(args.steps):
        ids, labels, mask, pix = batch(tok, rng, args.batch)
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - started:6.0f}s", flush=True)
    model.eval()
    save(model, tok, args.out)
    print(f"saved {args.out} in {time.time() - started:.0f}s", flush=True)
    if not args.no_eval:
        held_out = random.Random(args.seed + 1_000_003)
        right = 0
        for _ in range(args.eval):
            image, question, expected, _ = sample(held_out)
            right += answer(model, tok, image, question) == expected
        print(f"held-out accuracy (PyTorch, greedy): {right}/{args.eval}", flush=True)


if __name__ == "__main__":
    main()
