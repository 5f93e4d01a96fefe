"""Checkpoint → GGUF, one phase per module; ``convert`` is the driver.

The pipeline (and llama.cpp with it) is imported on the first call, so that importing the package
and starting the CLI stay light."""

from __future__ import annotations

__all__ = ["convert", "ConvertProgress"]


def convert(source, out=None, quant="Q4_K_M", mmproj_quant: str = "F16", name: str | None = None,
            force: bool = False, threads: int | None = None, verbose: bool = False, progress=None,
            via_llama_quantize: bool = False, imatrix=None, calibrate=None):
    """Convert a llava-style safetensors checkpoint to GGUF files plus manifest.json; returns the
    Manifest. ``quant``: types, comma-separated or a list ('all' = Q4_K_M, Q5_K_M, Q8_0).
    ``via_llama_quantize``: a lossless intermediate + llama.cpp's quantizer instead of one pass.
    ``imatrix``: an importance-matrix file (llama.cpp's GGUF or legacy .dat format). ``calibrate``: a
    folder of pictures — the F16 file, then an importance matrix calibrated on them (kept in the output
    folder as <name>.imatrix), then the requested types with it, in one call."""
    from .pipeline import convert as run
    if calibrate is not None:
        if imatrix is not None:
            from ..errors import OptionError
            raise OptionError("give --calibrate DIR or --imatrix FILE, not both")
        imatrix = calibrated(source, out, name, mmproj_quant, threads, verbose, progress, calibrate)
    return run(source, out=out, quant=quant, mmproj_quant=mmproj_quant, name=name, force=force, threads=threads,
               verbose=verbose, progress=progress, via_llama_quantize=via_llama_quantize, imatrix=imatrix)


def calibrated(source, out, name, mmproj_quant, threads, verbose, progress, pictures):
    """The F16 file (converted, or kept from before) and an importance matrix on ``pictures``."""
    from pathlib import Path

    from ..imatrix_tool import compute
    from .pipeline import convert as run
    manifest = run(source, out=out, quant="F16", mmproj_quant=mmproj_quant, name=name, threads=threads,
                   verbose=verbose, progress=progress)
    folder = Path(out) if out is not None else Path(f"{manifest.name}-gguf")
    target = folder / f"{manifest.name}.imatrix"
    compute(folder, target, images=Path(pictures), quant="F16", threads=threads, verbose=verbose)
    return target


def __getattr__(name: str):
    if name == "ConvertProgress":
        from .pipeline import ConvertProgress
        return ConvertProgress
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
