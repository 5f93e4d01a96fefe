"""Parity figures for docs/parity.md, "Checkpoint templates and rope thetas": for each hub template
style of tests/test_template_parity.py (non-default rope theta, 8x sharpened attention), the number of
prompt positions (ours / transformers' LlavaProcessor) and the max |Δ log-prob| over transformers'
top-10, F16, for a short and a 600+-token prompt, with and without a picture; and what the old
defect (theta 10000) would have cost on the long prompt.

    python bench/template_parity.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import numpy as np  # noqa: E402
from test_parity import top10_gap  # noqa: E402
from test_template_parity import CASES, LONG, QUESTION, transformers_logprobs  # noqa: E402
from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor  # noqa: E402

from acestep_gguf import VisionChat, convert  # noqa: E402


class _Folders:
    def mktemp(self, name):
        return Path(tempfile.mkdtemp(prefix=name))


def main() -> None:
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8))
    print("| checkpoint template | prompt | picture | positions (ours / transformers) | max abs Δ top-10 |")
    print("|---|---|---|---|---|")
    wrong_rows = []
    for name, make in CASES.items():
        model, ckpt, image_token = make(_Folders())
        out = Path(tempfile.mkdtemp()) / "gguf"
        convert(ckpt, out=out, quant="F16", name="m")
        template = json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"]
        processor = LlavaProcessor(image_processor=CLIPImageProcessor.from_pretrained(ckpt),
                                   tokenizer=AutoTokenizer.from_pretrained(ckpt), patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=template, image_token=image_token)
        with VisionChat.load(out, quant="F16", n_ctx=2048, n_gpu_layers=0) as chat:
            for label, text in (("short", QUESTION), ("long", LONG)):
                for picture in (image, None):
                    chat.reset()
                    reference, n = transformers_logprobs(model, processor, text, picture)
                    got = chat.next_token_logprobs(text, images=[picture] if picture is not None else [])
                    print(f"| {name} | {label} | {'yes' if picture else 'no'} | {chat.last_turn.prompt_positions} / {n} "
                          f"| {top10_gap(reference, got):.1e} |")
        rope = model.config.text_config.rope_parameters
        reference, _ = transformers_logprobs(model, processor, LONG)
        rope["rope_theta"] = 10_000.0
        model.model.language_model.rotary_emb.__init__(model.config.text_config)
        wrong, _ = transformers_logprobs(model, processor, LONG)
        wrong_rows.append((name, top10_gap(reference, wrong)))
    print("\n| checkpoint | long prompt with theta 10000 instead of the checkpoint's: max abs Δ top-10 |\n|---|---|")
    for name, gap in wrong_rows:
        print(f"| {name} | {gap:.1e} |")


if __name__ == "__main__":
    main()
