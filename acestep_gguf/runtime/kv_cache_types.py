"""The element types of the KV cache (`--cache-type-k` / `--cache-type-v`): F16 as llama.cpp defaults,
or Q8_0 / Q4_0 to fit a long context (or the whole 32B) in less memory. llama.cpp cannot make a
quantized V cache without flash attention (the context is refused), so flash attention is switched
on whenever V is quantized; a quantized row must hold whole blocks of 32, so a head size that is not a
multiple of 32 is refused here rather than inside llama.cpp."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import OptionError

# name -> (ggml type id, bytes per element: F16 2; Q8_0 34 bytes per block of 32; Q4_0 18 per 32)
KV_TYPES = {"f16": (1, 2.0), "q8_0": (8, 34 / 32), "q4_0": (2, 18 / 32)}
BLOCK = 32


@dataclass(frozen=True)
class CacheTypes:
    k: str = "f16"
    v: str = "f16"

    @classmethod
    def parse(cls, k: str | None = None, v: str | None = None) -> "CacheTypes":
        names = []
        for option, value in (("--cache-type-k", k), ("--cache-type-v", v)):
            name = (value or "f16").lower() if isinstance(value, str) or value is None else value
            if name not in KV_TYPES:
                raise OptionError(f"{option} {value!r}: choose {', '.join(KV_TYPES)}")
            names.append(name)
        return cls(*names)

    @property
    def quantized(self) -> bool:
        return self.k != "f16" or self.v != "f16"

    @property
    def flash_attn(self) -> bool:
        """llama.cpp needs flash attention for a quantized V cache."""
        return self.v != "f16"

    @property
    def ggml_k(self) -> int:
        return KV_TYPES[self.k][0]

    @property
    def ggml_v(self) -> int:
        return KV_TYPES[self.v][0]

    def bytes_per_token_layer(self, n_head_kv: int, head_dim: int) -> float:
        """K and V of one position in one layer."""
        return n_head_kv * head_dim * (KV_TYPES[self.k][1] + KV_TYPES[self.v][1])

    def check_head_dim(self, head_dim: int) -> None:
        if self.quantized and head_dim % BLOCK:
            raise OptionError(f"a {self.k}/{self.v} KV cache needs a head size that is a multiple of {BLOCK}; this "
                              f"model's is {head_dim} (use f16)")

    def __str__(self) -> str:
        return f"K {self.k}, V {self.v}"
