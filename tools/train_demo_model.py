"""Train the bundled demo model: ACE-Step 1.5's layout (LlavaForConditionalGeneration: Qwen2 language
model + CLIP ViT with 14-pixel patches + 2-layer GELU MLP projector, ChatML template), scaled down
until it trains on 2 CPU cores (about 17 minutes), on the shapes task in acestep_gguf.shapes: 112-pixel
input (8 x 8 patches, so that a shape a tenth of the picture still covers a patch), the wide picture
distribution of shapes.py, and a training-only probe that asks the vision features for the scene.

    python tools/train_demo_model.py --out acestep_gguf/demo_model            # the shipped model
    python tools/train_demo_model.py --out /tmp/smoke --steps 3 --no-eval     # smoke test

Dev dependencies only (torch, transformers, tokenizers, safetensors). Deterministic from --seed for a
given --threads (the shipped model: the defaults; another thread count changes float summation
order, and with it the weights)."""

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
from acestep_gguf.shapes import BACKGROUNDS, COLOURS, NO_SHAPES, NUMBERS, QUESTIONS, SHAPES, draw, random_scene, sample  # noqa: E402

IMAGE_SIZE, PATCH = 112, 14
EMPTY = 0.08  # share of training pictures with no shapes (answer: "I don't see any shapes.")
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
    words += [NO_SHAPES] * 20
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
    vision = CLIPVisionConfig(hidden_size=160, intermediate_size=640, num_hidden_layers=4, num_attention_heads=4,
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


class SceneHead(torch.nn.Module):
    """Training-only probe on the features the projector reads: shape, colour and count straight
    from the pooled vision features. Its gradient teaches the vision tower to see the shapes far
    sooner than the language-model loss alone, which reaches the tower through one answer token.
    Not saved: the shipped checkpoint is a plain LLaVA."""

    def __init__(self, width: int):
        super().__init__()
        self.out = torch.nn.Linear(2 * width, len(SHAPES) + len(COLOURS) + len(NUMBERS))

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([features.mean(1), features.amax(1)], dim=-1)
        logits = self.out(pooled)
        s, c = len(SHAPES), len(SHAPES) + len(COLOURS)
        ce = torch.nn.functional.cross_entropy
        return (ce(logits[:, :s], targets[:, 0], ignore_index=-100) + ce(logits[:, s:c], targets[:, 1], ignore_index=-100)
                + ce(logits[:, c:], targets[:, 2]))


def batch(tok: Tokenizer, rng: random.Random, size: int):
    end = tok.token_to_id("<|im_end|>")
    rows, labels, pix, scenes = [], [], [], []
    for _ in range(size):
        scene = random_scene(rng, EMPTY)
        image = draw(scene, rng, max_short=168)
        kind = rng.choice(list(QUESTIONS))
        question, answer = rng.choice(QUESTIONS[kind]), scene.answer(kind)
        known = scene.count > 0
        scenes.append([SHAPES.index(scene.shape) if known else -100,
                       list(COLOURS).index(scene.colour) if known else -100, scene.count])
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
    return ids, lab, mask, torch.stack(pix), torch.tensor(scenes)


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
    ap.add_argument("--steps", type=int, default=2900)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--probe-weight", type=float, default=0.5, help="weight of the training-only scene probe's loss")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval", type=int, default=120, help="held-out pictures for the final check")
    ap.add_argument("--no-eval", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    tok = build_tokenizer()
    model = LlavaForConditionalGeneration(build_config(tok))
    head = SceneHead(model.config.vision_config.hidden_size)
    seen = {}
    model.model.multi_modal_projector.register_forward_hook(lambda m, args, out: seen.__setitem__("features", args[0]))
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    started = time.time()
    model.train()
    for step in range(args.steps):
        ids, labels, mask, pix, scenes = batch(tok, rng, args.batch)
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels).loss
        probe = head(seen.pop("features"), scenes)
        opt.zero_grad()
        (loss + args.probe_weight * probe).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  probe {probe.item():.4f}  {time.time() - started:6.0f}s", flush=True)
    model.eval()
    save(model, tok, args.out)
    print(f"saved {args.out} in {time.time() - started:.0f}s", flush=True)
    if not args.no_eval:
        held_out = random.Random(args.seed + 1_000_003)
        right: dict[str, list[bool]] = {k: [] for k in QUESTIONS}
        for _ in range(args.eval):
            image, question, expected, kind = sample(held_out)
            right[kind].append(answer(model, tok, image, question) == expected)
        print("held-out accuracy (PyTorch, greedy): " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in right.items()),
              flush=True)


if __name__ == "__main__":
    main()
