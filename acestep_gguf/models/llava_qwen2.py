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

# Qwen2Config's defaults (transformers 5), for the fields a hub config leaves out (rope and tying
# follow transformers' precedence rules in text_hparams.py).
QWEN2_DEFAULTS = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 32768,
                  "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "sliding_window": 4096}

QWEN2 = LanguageModel(gguf_arch="qwen2", model_types=("qwen2",), tokenizer="gpt2", qkv_bias=True,
                      builtin_template=CHATML_TEMPLATE, config_defaults={"qwen2": QWEN2_DEFAULTS},
                      is_70b=lambda h: h.n_layer == 80)  # llama.cpp src/models/qwen2.cpp

FAMILY = Family(name="llava_qwen2", architectures=("LlavaForConditionalGeneration",), language=QWEN2,
                description="Qwen2 + CLIP + MLP projector (ACE-Step 1.5)")
