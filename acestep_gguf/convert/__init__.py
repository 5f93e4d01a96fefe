"""Checkpoint → GGUF, one phase per module; ``convert`` is the driver.

The pipeline (and llama.cpp with it) is imported on the first call, so that importing the package
and starting the CLI stay light."""

from __future__ import annotations

__all__ = ["convert", "ConvertProgress"]


def convert(source, out=None, quant="Q4_K_M", mmproj_quant: str = "F16", name: str | None = None,
            force: bool = False, threads: int | None = None, verbose: bool = False, progress=None,
            via_llama_quantize: bool = False, imatrix=None):
    """Convert a llava-style safetensors checkpoint to GGUF files plus manifest.json; returns the
    Manifest. ``quant``: types, comma-separated or a list ('all' = Q4_K_M, Q5_K_M, Q8_0).
    ``via_llama_quantize``: a lossless intermediate + llama.cpp's quantizer instead of one pass.
    ``imatrix``: an importance-matrix file (llama.cpp's GGUF or legacy .dat format)."""
    from .pipeline import convert as run
    return run(source, out=out, quant=quant, mmproj_quant=mmproj_quant, name=name, force=force, threads=threads,
               verbose=verbose, progress=progress, via_llama_quantize=via_llama_quantize, imatrix=imatrix)


def __getattr__(name: str):
    if name == "ConvertProgress":
        from .pipeline import ConvertProgress
        return ConvertProgress
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
