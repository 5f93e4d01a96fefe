"""LLaVA-1.5 and BakLLaVA: ``LlavaForConditionalGeneration`` with a Llama (Vicuna) or Mistral
language model (no q/k/v biases, a SentencePiece vocabulary with byte fallback), a CLIP ViT-L/14-336
vision tower and a two-layer GELU MLP projector — llama.cpp's ``llama`` architecture (Mistral 7B is
a Llama in llama.cpp) plus a ``clip`` mmproj. Checkpoints: llava-hf/llava-1.5-7b-hf,
llava-hf/llava-1.5-13b-hf, llava-hf/bakLlava-v1-hf."""

from __future__ import annotations

from .family import Family, LanguageModel

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT: ...</s>USER: ..."), used when the
# checkpoint has no template that renders the runtime's conversations: llava-hf's own, images first
# with a newline after each (LLaVA-1.5 was trained so), pictures written as the media marker.
LLAVA_1_5_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string else "
    "message['content'] | map(attribute='text') | join('') }}{{ ' ' }}"
    "{% else %}{{ message['role'] | upper }}{{ ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ('image', 'image_url', 'input_image') %}{{ '<__media__>\\n' }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# LlamaConfig's and MistralConfig's defaults (transformers 5): llava-1.5-7b-hf's text_config stores only
# max_position_embeddings, rms_norm_eps and vocab_size. (Mistral's 4096-token sliding window is not
# applied by llama.cpp's llama architecture: exact up to 4096 positions of context; convert says so.)
LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                  "tie_word_embeddings": False}
MISTRAL_DEFAULTS = {**LLAMA_DEFAULTS, "intermediate_size": 14336, "num_key_value_heads": 8,
                    "max_position_embeddings": 131072, "sliding_window": 4096}

LLAMA = LanguageModel(gguf_arch="llama", model_types=("llama", "mistral"), tokenizer="llama", qkv_bias=False,
                      builtin_template=LLAVA_1_5_TEMPLATE, rope_permute=True,
                      config_defaults={"llama": LLAMA_DEFAULTS, "mistral": MISTRAL_DEFAULTS},
                      # llama.cpp src/models/llama.cpp: 80 layers are 70B with GQA, 65B without
                      is_70b=lambda h: h.n_layer == 80 and h.n_head != h.n_head_kv)

FAMILY = Family(name="llava_llama", architectures=("LlavaForConditionalGeneration",), language=LLAMA,
                description="Llama or Mistral + CLIP + MLP projector (LLaVA-1.5, BakLLaVA)")
