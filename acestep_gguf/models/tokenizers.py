"""The tokenizer kinds a family can use, as llama.cpp reads them back: the GGUF keys and the types
its vocabulary loader demands (llama-vocab.cpp reads these arrays raw; a wrong element type is an
out-of-bounds read or an abort). The converter builds them in convert/tokenizer.py."""

from __future__ import annotations

from gguf import GGUFValueType as T
from gguf import Keys

from .fields import MAX_VOCAB

K = Keys.Tokenizer
_COMMON = {
    K.MODEL: (T.STRING, None, True, None),
    K.PRE: (T.STRING, None, False, None),
    K.LIST: (T.ARRAY, T.STRING, True, (1, MAX_VOCAB)),
}
TOKENIZER_KEYS = {
    # byte-level BPE (GPT-2 style), with a named pre-tokenizer (Qwen2: 'qwen2')
    "gpt2": {**_COMMON, K.TOKEN_TYPE: (T.ARRAY, T.INT32, False, (1, MAX_VOCAB)),
             K.SCORES: (T.ARRAY, T.FLOAT32, False, (1, MAX_VOCAB)), K.MERGES: (T.ARRAY, T.STRING, True, None)},
    # SentencePiece (Llama, Mistral): pieces with scores that order the merges, byte-fallback tokens
    "llama": {**_COMMON, K.TOKEN_TYPE: (T.ARRAY, T.INT32, True, (1, MAX_VOCAB)),
              K.SCORES: (T.ARRAY, T.FLOAT32, True, (1, MAX_VOCAB)), K.ADD_PREFIX: (T.BOOL, None, False, None)},
}
