"""ACE-Step 1.5's family: ``LlavaForConditionalGeneration`` with a Qwen2 language model (q/k/v
biases, byte-level BPE with Qwen2's pre-tokenizer, ChatML), a CLIP vision tower and a two-layer
GELU MLP projector — llama.cpp's ``qwen2`` architecture plus a ``clip`` mmproj."""

from __future__ import annotations

from .family import Family, LanguageModel

# Used when the checkpoint's own template cannot render the runtime's conversations. Images become
# the multimodal marker exactly where they appear; no system prompt is added.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ('image', 'image_url', 'input_image') %}{{ '<__media__>' }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

QWEN2 = LanguageModel(gguf_arch="qwen2", model_types=("qwen2",), tokenizer="gpt2", qkv_bias=True,
                      builtin_template=CHATML_TEMPLATE, default_rope_theta=1_000_000.0)

FAMILY = Family(name="llava_qwen2", architectures=("LlavaForConditionalGeneration",), language=QWEN2,
                description="Qwen2 + CLIP + MLP projector (ACE-Step 1.5)")
