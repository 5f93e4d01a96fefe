"""The `acestep-gguf` command: parse arguments, call the library, print. Nothing else lives here."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from . import __version__
from .errors import AcestepGGUFError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert llava-style (Qwen2 + CLIP + MLP) checkpoints to GGUF and chat about images offline.")
err = Console(stderr=True)
out = Console(highlight=False, soft_wrap=True)


@contextmanager
def _errors():
    """Library errors become one red line and exit code 1; Ctrl-C exits 130, leaving no partial files."""
    try:
        yield
    except AcestepGGUFError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        raise typer.Exit(130) from None


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def default_model_folder() -> Path:
    """$ACESTEP_GGUF_MODEL, else the demo model's converted folder in the user cache."""
    from .demo import demo_gguf_folder
    configured = os.environ.get("ACESTEP_GGUF_MODEL")
    return Path(configured).expanduser() if configured else demo_gguf_folder()


# -- convert ---------------------------------------------------------------------------------------
class _AmountColumn(ProgressColumn):
    """'1.2/3.4 GB' for byte phases, '12/339 tensors' for quantize phases."""

    def render(self, task) -> Text:
        if task.fields.get("unit") == "bytes":
            return Text(f"{_size(int(task.completed))} / {_size(int(task.total or 0))}")
        return Text(f"{int(task.completed)}/{int(task.total or 0)} {task.fields.get('unit', '')}")


class _RichConvertProgress:
    def __init__(self, show_bars: bool, show_lines: bool):
        self.show_lines = show_lines
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), _AmountColumn(), TimeRemainingColumn(),
                            console=err, transient=True) if show_bars else None
        self.task = None

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()

    def phase(self, name: str, total: int, unit: str) -> None:
        if self.bar:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(name, total=total, unit=unit)

    def advance(self, completed: int) -> None:
        if self.bar and self.task is not None:
            self.bar.update(self.task, completed=completed)

    def file_done(self, entry, reused: bool) -> None:
        if self.bar and self.task is not None:
            self.bar.remove_task(self.task)
            self.task = None
        if self.show_lines:
            verb = "kept (unchanged)" if reused else "wrote"
            err.print(f"{verb} {entry.file}  ({entry.role}, {entry.type}, {_size(entry.bytes)})", highlight=False,
                      markup=False)


@app.command()
def convert(
    source: str = typer.Argument(..., help="Checkpoint folder or Hugging Face repo id (owner/name)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: ./<name>-gguf)."),
    quant: str = typer.Option("Q4_K_M", "--quant", "-q", help="Language-model types, comma-separated: Q4_K_M, "
                              "Q5_K_M, Q8_0, F16, BF16, or 'all' (the three quantized ones)."),
    mmproj_quant: str = typer.Option("F16", "--mmproj-quant", help="Vision projector type: F16 or Q8_0."),
    name: Optional[str] = typer.Option(None, "--name", help="Base name of the output files (default: source name)."),
    force: bool = typer.Option(False, "--force", help="Redo outputs even when the manifest says they match."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Quantizer threads (default: all cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="Print errors only."),
    verbose: bool = typer.Option(False, "--verbose", help="Show llama.cpp's own log."),
):
    """Convert a llava-style safetensors checkpoint to GGUF (+ mmproj + manifest.json)."""
    from .convert import convert as run_convert
    with _errors(), _RichConvertProgress(err.is_terminal and not quiet and not as_json, not quiet and not as_json) as p:
        manifest = run_convert(source, out=out_dir, quant=quant, mmproj_quant=mmproj_quant, name=name, force=force,
                               threads=threads, verbose=verbose, progress=p)
    if as_json:
        out.print(manifest.to_json(), end="")
    elif not quiet:
        folder = out_dir or Path(f"{manifest.name}-gguf")
        err.print(f"done: {folder}/manifest.json  (chat with: acestep-gguf chat IMAGE -m {folder})", highlight=False)


# -- chat ------------------------------------------------------------------------------------------
def _load_chat(model: Optional[Path], quant, ctx, threads, gpu_layers, vram, system, seed, verbose):
    from .runtime import VisionChat
    folder = model or default_model_folder()
    layers = gpu_layers if gpu_layers == "auto" else int(gpu_layers)
    if model is not None and model.is_file():
        raise AcestepGGUFError(f"{model}: pass the converted folder (with manifest.json), not a single .gguf file")
    if model is None and not folder.exists():
        raise AcestepGGUFError(f"no model: pass -m FOLDER, set ACESTEP_GGUF_MODEL, or run `acestep-gguf demo` once "
                               f"to convert the bundled demo model into {folder}")
    session = VisionChat.load(folder, quant=quant, n_ctx=ctx, n_threads=threads, n_gpu_layers=layers, vram=vram,
                              system=system, seed=seed, verbose=verbose)
    if not session.exact_vision:
        err.print("[yellow]warning:[/yellow] this llama-cpp-python build mis-orders llava image tokens "
                  "(llama.cpp#25814); answers about images are degraded. Install with tools/build_llama_cpp.sh.")
    return session


def _usage(chat) -> dict:
    t = chat.last_turn
    return {"prompt_tokens": t.prompt_positions, "evaluated_tokens": t.evaluated_positions,
            "reused_tokens": t.reused_positions, "images_encoded": t.images_encoded,
            "completion_tokens": t.completion_tokens, "finish_reason": t.finish_reason}


@app.command()
def chat(
    images: List[str] = typer.Argument(None, help="Images for the first message (JPEG, PNG, WEBP)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Converted folder (default: the demo model)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer this once and exit."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Language-model type (default: best present)."),
    max_tokens: int = typer.Option(512, "--max-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (deterministic)."),
    top_p: float = typer.Option(0.95, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    ctx: int = typer.Option(8192, "--ctx", help="Context length in tokens."),
    threads: Optional[int] = typer.Option(None, "--threads"),
    gpu_layers: str = typer.Option("auto", "--gpu-layers", help="'auto' (planned from --vram) or a number."),
    vram: Optional[str] = typer.Option(None, "--vram", help="GPU memory budget, e.g. 12GiB (default: free VRAM)."),
    as_json: bool = typer.Option(False, "--json", help="With -p: print one JSON object instead of streaming."),
    verbose: bool = typer.Option(False, "--verbose", help="Show llama.cpp's own log."),
):
    """Ask about images: once with -p, or interactively (/image PATH, /reset, /quit; Ctrl-D ends)."""
    sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    with _errors():
        session = _load_chat(model, quant, ctx, threads, gpu_layers, vram, system, seed, verbose)
        with session:
            if prompt is not None:
                _one_shot(session, prompt, images or [], sampling, as_json)
            else:
                _interactive(session, images or [], sampling)


def _one_shot(session, prompt, images, sampling, as_json):
    if as_json:
        text = session.ask(prompt, images, **sampling)
        t = session.last_turn
        out.print(json.dumps({"text": text, "model": str(session.model_path), "quant": session.quant,
                              "usage": _usage(session), "timings": {
                                  "time_to_first_token_s": round(t.time_to_first_token_s, 4),
                                  "decode_tokens_per_s": round(t.decode_tokens_per_s, 2)}}))
        return
    for piece in session.stream(prompt, images, **sampling):
        out.print(piece, end="")
    out.print()


def _interactive(session, images, sampling):
    pending = list(images)
    tty = sys.stdin.isatty()
    if tty:
        err.print(f"[dim]{session.model_path.name} — /image PATH attaches an image, /reset, /quit; Ctrl-D ends[/dim]")
    while True:
        if tty:
            err.print("[bold]>[/bold] ", end="")
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            pending = []
            err.print("[dim]conversation reset[/dim]")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not path:
                err.print("[red]error:[/red] /image needs a path")
                continue
            pending.append(path)
            continue
        try:
            for piece in session.stream(line, pending, **sampling):
                out.print(piece, end="")
            out.print()
        except AcestepGGUFError as e:  # a bad image or a full context ends the turn, not the session
            err.print(f"[red]error:[/red] {e}", highlight=False)
        pending = []


# -- caption ---------------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@app.command()
def caption(
    inputs: List[Path] = typer.Argument(..., help="Image files and/or folders (searched for .jpg .png .webp)."),
    prompt: str = typer.Option("Describe this image.", "--prompt", "-p"),
    out_file: Path = typer.Option(..., "--out", "-o", help="JSON-lines file; images already in it are skipped."),
    model: Optional[Path] = typer.Option(None, "--model", "-m"),
    quant: Optional[str] = typer.Option(None, "--quant"),
    max_tokens: int = typer.Option(256, "--max-tokens"),
    ctx: int = typer.Option(4096, "--ctx"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    gpu_layers: str = typer.Option("auto", "--gpu-layers"),
    vram: Optional[str] = typer.Option(None, "--vram"),
    verbose: bool = typer.Option(False, "--verbose"),
):
    """Caption many images with one loaded model; resumable, bad images recorded as errors."""
    from .runtime.caption import caption_images, collect_images
    with _errors():
        files = collect_images(inputs, IMAGE_SUFFIXES)
        session = _load_chat(model, quant, ctx, threads, gpu_layers, vram, None, None, verbose)
        with session, Progress(TextColumn("captioning"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                               console=err, transient=True, disable=not err.is_terminal) as bar:
            task = bar.add_task("captioning", total=len(files))
            summary = caption_images(session, files, prompt, out_file, max_tokens=max_tokens,
                                     on_image=lambda record: bar.advance(task))
    err.print(f"{summary['captioned']} captioned, {summary['skipped']} already done, {summary['failed']} failed "
              f"→ {out_file}", highlight=False)


# -- plan ------------------------------------------------------------------------------------------
@app.command()
def plan(
    model: Optional[Path] = typer.Argument(None, help="Converted folder or .gguf file."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Plan for a model card instead: ace-step-1.5."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Language-model type (with --preset: default Q4_K_M)."),
    mmproj_quant: str = typer.Option("F16", "--mmproj-quant"),
    vram: str = typer.Option("12GiB", "--vram", help="GPU memory budget, e.g. 12GiB, 11.5GB."),
    ctx: int = typer.Option(8192, "--ctx"),
    as_json: bool = typer.Option(False, "--json"),
):
    """How many layers fit on the GPU: weights, KV cache, compute buffers, mmproj, margin."""
    import llama_cpp

    from .runtime import offload
    from .runtime.model_files import resolve
    with _errors():
        if preset:
            shape = offload.shape_from_preset(preset, (quant or "Q4_K_M").upper(), mmproj_quant.upper())
            what = f"{preset} {(quant or 'Q4_K_M').upper()} (model card)"
        elif model is not None:
            if model.is_file():
                shape, what = offload.shape_from_gguf(model, None), model.name
            else:
                files = resolve(model, quant=quant)
                shape, what = offload.shape_from_gguf(files.model, files.mmproj), files.model.name
        else:
            raise AcestepGGUFError("give a model folder / .gguf file, or --preset ace-step-1.5")
        result = offload.plan(shape, offload.parse_size(vram), ctx, gpu_available=True)
    if as_json:
        out.print(json.dumps(result.to_dict()))
        return
    table = Table(title=f"{what}: {result.n_gpu_layers} GPU layers for {vram} at {ctx} context", title_justify="left")
    table.add_column("item")
    table.add_column("GPU", justify="right")
    table.add_column("CPU", justify="right")
    cpu_weights = result.language_weights_bytes - result.gpu_weights_bytes
    for label, gpu, cpu in (("language weights", result.gpu_weights_bytes, cpu_weights),
                            ("KV cache (F16)", result.kv_cache_bytes, result.kv_cache_total_bytes - result.kv_cache_bytes),
                            ("compute buffer", result.compute_bytes, 0), ("mmproj weights", result.mmproj_bytes, 0),
                            ("mmproj activations (1 image)", result.mmproj_compute_bytes, 0),
                            ("safety margin", result.margin_bytes, 0)):
        table.add_row(label, _size(gpu), _size(cpu) if cpu else "")
    table.add_row("headroom", _size(result.headroom_bytes), "")
    out.print(table)
    where = "GPU" if result.output_on_gpu else "CPU"
    out.print(f"--gpu-layers {result.n_gpu_layers}: {result.reason}; output layer on the {where}", highlight=False)
    if not llama_cpp.llama_supports_gpu_offload():
        out.print("note: this llama-cpp-python build is CPU-only; `chat --gpu-layers auto` will use 0 here "
                  "(see README: building with CUDA)")


# -- info ------------------------------------------------------------------------------------------
@app.command()
def info(file: Path = typer.Argument(..., help="A .gguf file (language model or mmproj)."),
         as_json: bool = typer.Option(False, "--json")):
    """Architecture, type, size, tokenizer, template and vision settings of a GGUF file."""
    from .runtime.inspect import describe
    with _errors():
        facts = describe(file)
    if as_json:
        out.print(json.dumps(facts))
        return
    for key, value in facts.items():
        out.print(f"[bold]{key}[/bold]: {value}", highlight=False)


# -- demo ------------------------------------------------------------------------------------------
@app.command()
def demo(
    image: Optional[str] = typer.Argument(None, help="An image to ask about (default: a freshly drawn one)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The question (default: a random one)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the drawn picture and question."),
    quant: str = typer.Option("Q8_0", "--quant"),
    verbose: bool = typer.Option(False, "--verbose"),
):
    """Convert the bundled demo model (once), draw a picture of shapes, and ask about it."""
    from . import demo as demo_lib
    with _errors():
        with err.status("preparing the demo model (first run converts it)…"):
            folder = demo_lib.ensure_demo_model(quant)
        result = demo_lib.run_demo(folder, image=image, prompt=prompt, seed=seed, quant=quant, verbose=verbose)
    out.print(f"image:    {result['image']}", highlight=False)
    out.print(f"question: {result['question']}", highlight=False)
    out.print(f"answer:   {result['answer']}", highlight=False)
    if result.get("expected"):
        out.print(f"expected: {result['expected']}", highlight=False)


@app.command()
def version():
    """Print the versions of acestep-gguf and llama-cpp-python."""
    import llama_cpp
    out.print(f"acestep-gguf {__version__}, llama-cpp-python {llama_cpp.__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
