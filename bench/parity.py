"""Parity figures for docs/parity.md: tiny real LlavaForConditionalGeneration models (tests/builders.py)
of each family, converted, against transformers in float32.

    python bench/parity.py                 # the Qwen2 family (ACE-Step 1.5's layout): F16, BF16, Q8_0
    python bench/parity.py --family llama  # LLaVA-1.5 (Llama) and BakLLaVA (Mistral): F16, Q8_0
    python bench/parity.py --family next   # LLaVA-NeXT (Mistral): pictures of several shapes, F16, Q8_0
    python bench/parity.py --family pixtral  # Pixtral (Mistral with a byte-level BPE): several shapes, F16, Q8_0
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from builders import (LLAMA_TOKENIZER_CONFIG, build_model, build_tokenizer, save_checkpoint, tiny_config,  # noqa: E402
                      tiny_llama_config)
from test_parity import (QUESTION, encode_with_llama, hf_logprobs, pixel_values, top10_gap)  # noqa: E402
from transformers import CLIPImageProcessor  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402

from acestep_gguf import VisionChat, convert  # noqa: E402


def llama_family() -> None:
    import json

    from spm_vocab import llama_tokenizer_json
    from test_llama_family import hf_logprobs as llava_logprobs
    from tokenizers import Tokenizer
    spm = Tokenizer.from_str(json.dumps(llama_tokenizer_json()))
    rng = np.random.default_rng(11)
    image = Image.fromarray(rng.integers(0, 256, (90, 70, 3), np.uint8))
    print("| language model | file | prompt | same top-1 | max abs Δ log-prob over transformers' top-10 |\n|---|---|---|---|---|")
    for text in ("llama", "mistral"):
        model = build_model(tiny_llama_config(spm, text))
        work = Path(tempfile.mkdtemp())
        ckpt = save_checkpoint(model, spm, work / "ckpt", style="hub4", shards=2, tokenizer_config=LLAMA_TOKENIZER_CONFIG)
        convert(ckpt, out=work / "out", quant="F16,Q8_0", name="p")
        for quant in ("F16", "Q8_0"):
            with VisionChat.load(work / "out", quant=quant, n_gpu_layers=0) as chat:
                for name, picture in (("text only", None), ("image: random noise 90x70", image)):
                    chat.reset()
                    ref = llava_logprobs(model, spm, picture)
                    got = chat.next_token_logprobs(QUESTION, images=[picture] if picture is not None else [])
                    print(f"| {text} | {quant} | {name} | {got.argmax() == ref.argmax()} | {top10_gap(ref, got):.1e} |")


def llava_next_family() -> None:
    """The tiny LLaVA-NeXT of tests/test_llava_next.py against transformers' LlavaNextProcessor + model."""
    import json

    import test_llava_next as t
    from spm_vocab import llama_tokenizer_json
    from tokenizers import Tokenizer
    from transformers import LlavaNextForConditionalGeneration
    spm = Tokenizer.from_str(json.dumps(llama_tokenizer_json()))
    model = build_model(t.tiny_next_config(spm), cls=LlavaNextForConditionalGeneration)
    work = Path(tempfile.mkdtemp())
    ckpt = save_checkpoint(model, spm, work / "ckpt", style="hub4", shards=2, preprocessor=t.PREPROCESSOR,
                           tokenizer_config={**LLAMA_TOKENIZER_CONFIG, "chat_template": t.MISTRAL_NEXT_TEMPLATE})
    convert(ckpt, out=work / "out", quant="F16,Q8_0", name="p")
    processor = t.processor.__wrapped__((model, ckpt, work / "out"))  # the test's: the checkpoint's own pieces
    shape_rows(t, model, processor, work / "out", n_ctx=2048)
    with VisionChat.load(work / "out", quant="F16", n_ctx=2048, n_gpu_layers=0) as chat:
        worst = 0.0
        for name in t.SHAPES:
            inputs = processor(images=[t.picture(name)], text="<image>", return_tensors="pt")
            with torch.no_grad():
                out = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                     vision_feature_layer=-2, vision_feature_select_strategy="default")
            ref = torch.cat(list(out.pooler_output)).numpy()
            got = chat.encode_image(t.picture(name))
            worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
    print(f"\npacked image features (F16, all shapes): max |Δ| / max |feature| = {worst:.1e}")


def pixtral_family() -> None:
    """The tiny Pixtral of tests/test_pixtral.py against transformers' PixtralProcessor + model."""
    import test_pixtral as t
    bpe = t.build_bpe()
    model = build_model(t.tiny_pixtral_config(bpe))
    work = Path(tempfile.mkdtemp())
    ckpt = save_checkpoint(model, bpe, work / "ckpt", style="saved5", shards=2, tokenizer_config=t.TOKENIZER_CONFIG,
                           preprocessor=t.PREPROCESSOR)
    convert(ckpt, out=work / "out", quant="F16,Q8_0", name="p")
    processor = t.processor.__wrapped__((model, ckpt, work / "out"))
    shape_rows(t, model, processor, work / "out", n_ctx=1024)


def shape_rows(t, model, processor, folder: Path, n_ctx: int) -> None:
    """One table row per file and picture shape of test module ``t`` (its SHAPES, picture, reference)."""
    print("| file | picture (w x h) | positions (ours / transformers) | same top-1 | max abs Δ log-prob over "
          "transformers' top-10 | another picture moves it by |\n|---|---|---|---|---|---|")
    for quant in ("F16", "Q8_0"):
        with VisionChat.load(folder, quant=quant, n_ctx=n_ctx, n_gpu_layers=0) as chat:
            for name in [None, *t.SHAPES]:
                image = t.picture(name) if name else None
                ref, n_prompt = t.reference(model, processor, image)
                chat.reset()
                got = chat.next_token_logprobs(t.QUESTION, images=[image] if image else [])
                shape = f"{name} {t.SHAPES[name][0]}x{t.SHAPES[name][1]}" if name else "none (text only)"
                other = t.reference(model, processor, t.picture("tall" if name != "tall" else "wide"))[0] if name else None
                moved = f"{top10_gap(ref, other):.1e}" if name else ""
                print(f"| {quant} | {shape} | {chat.last_turn.prompt_positions} / {n_prompt} | "
                      f"{got.argmax() == ref.argmax()} | {top10_gap(ref, got):.1e} | {moved} |")


def main() -> None:
    torch.set_num_threads(2)
    family = sys.argv[sys.argv.index("--family") + 1] if "--family" in sys.argv else "qwen2"
    if family == "llama":
        return llama_family()
    if family == "next":
        return llava_next_family()
    if family == "pixtral":
        return pixtral_family()
    tok = build_tokenizer()
    model = build_model(tiny_config(tok))
    work = Path(tempfile.mkdtemp())
    convert(save_checkpoint(model, tok, work / "ckpt"), out=work / "out", quant="F16,BF16,Q8_0", name="p")
    rng = np.random.default_rng(11)
    images = {"random noise 90x70": Image.fromarray(rng.integers(0, 256, (90, 70, 3), np.uint8)),
              "random noise 56x56": Image.fromarray(rng.integers(0, 256, (56, 56, 3), np.uint8)),
              "flat colour 80x60": Image.new("RGB", (80, 60), (200, 40, 40))}
    print("| model | prompt | same top-1 | max abs Δ log-prob over transformers' top-10 |\n|---|---|---|---|")
    for quant in ("F16", "BF16", "Q8_0"):
        with VisionChat.load(work / "out", quant=quant) as chat:
            ref = hf_logprobs(model, tok)
            got = chat.next_token_logprobs(QUESTION)
            print(f"| {quant} | text only | {got[:len(ref)].argmax() == ref.argmax()} | {top10_gap(ref, got):.1e} |")
            for name, image in images.items():
                ref = hf_logprobs(model, tok, image)
                got = chat.next_token_logprobs(QUESTION, images=[image])
                print(f"| {quant} | image: {name} | {got[:len(ref)].argmax() == ref.argmax()} | {top10_gap(ref, got):.1e} |")
    with VisionChat.load(work / "out", quant="F16") as chat:
        image = images["random noise 90x70"]
        got = encode_with_llama(chat, image)
        with torch.no_grad():
            tower = model.model.vision_tower(pixel_values(image), output_hidden_states=True)
            ref = model.model.multi_modal_projector(tower.hidden_states[-2][:, 1:])[0].numpy()
        print(f"\nimage features (mtmd vs get_image_features): max |Δ| / max |feature| = "
              f"{np.abs(got - ref).max() / np.abs(ref).max():.1e}")
        ref_lp = hf_logprobs(model, tok, image)
        ours = chat.next_token_logprobs(QUESTION, images=[image])
        model.model.multi_modal_projector.act = ACT2FN["gelu_pytorch_tanh"]
        for layer in model.model.vision_tower.encoder.layers:
            layer.mlp.activation_fn = ACT2FN["gelu_pytorch_tanh"]
        tanh = top10_gap(hf_logprobs(model, tok, image), ours)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.copy_(p.half().float())
        rounded = top10_gap(hf_logprobs(model, tok, image), ours)
        print(f"image prompt gap: as is {top10_gap(ref_lp, ours):.1e}; transformers with tanh-GELU "
              f"{tanh:.1e}; and F16-rounded matrices {rounded:.1e}")
    processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    worst = max(np.abs(pixel_values(im)[0].numpy() - processor(images=im, return_tensors="np")["pixel_values"][0]).max()
                for im in images.values())
    print(f"pixel preparation vs CLIPImageProcessor (PIL backend): max |Δ| = {worst:.1e} (normalised units)")


if __name__ == "__main__":
    main()
