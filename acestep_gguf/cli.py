"""The `acestep-gguf` command: parse arguments, call the library, print. Nothing else lives here.

Text that comes from a model, a template, a file or the user is printed literally (no Rich markup,
no emoji codes): a reply containing "[/INST]" or ":smile:" shows exactly that."""

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
from .errors import AcestepGGUFError, OptionError
from .models.fields import MAX_PARALLEL

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Convert llava-style (Qwen2, Llama or Mistral + CLIP + MLP) checkpoints to GGUF and chat about images offline.")
err = Console(stderr=True, highlight=False, markup=False, emoji=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)


def say(text: str, end: str = "\n") -> None:
    """Model output and facts, byte for byte, to stdout."""
    out.file.write(text + end)
    out.file.flush()


def note(text: str, style: str = "dim") -> None:
    err.print(Text(text, style=style), soft_wrap=True)


def error_line(message: str) -> None:
    err.print(Text.assemble(("error: ", "red"), str(message)), soft_wrap=True)


@contextmanager
def _errors():
    """Library errors become one red line and exit code 1; Ctrl-C exits 130, leaving no partial files."""
    try:
        yield
    except AcestepGGUFError as e:
        error_line(str(e))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print(Text("interrupted", style="red"))
        raise typer.Exit(130) from None


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _auto_or_count(value: str, flag: str, what: str, low: int, high: int | None = None, hint: str = "") -> str | int:
    """An option that is 'auto' or a whole number from ``low`` (to ``high``) of ``what``."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise OptionError(f"{flag} {value!r}: use 'auto' or a whole number of {what}{hint}") from None
    if n < low:
        raise OptionError(f"{flag} {value}: the number of {what} cannot be " + ("negative" if low == 0 else f"below {low}"))
    if high is not None and n > high:
        raise OptionError(f"{flag} {value}: at most {high} {what}")
    return n


def parallel_option(value: str) -> str | int:
    """--parallel: 'auto' or a number of conversations decoded together."""
    return _auto_or_count(value, "--parallel", "conversations", 1, MAX_PARALLEL)


def gpu_layers_option(value: str) -> str | int:
    """--gpu-layers: 'auto' or a whole number of at least 0."""
    return _auto_or_count(value, "--gpu-layers", "layers", 0, hint=" (0 = CPU only)")


def default_model_folder(quant: str | None = None) -> Path:
    """$ACESTEP_GGUF_MODEL, else the demo model (converted on demand, with ``quant`` if asked for)."""
    configured = os.environ.get("ACESTEP_GGUF_MODEL")
    if configured:
        return Path(configured).expanduser()
    from .demo import ensure_demo_model
    with err.status("preparing the demo model (converting it the first time)…", spinner="dots"):
        return ensure_demo_model(quant.upper() if quant else None)


# Options that chat, serve and caption share: declared once.
MODEL_OPTION = typer.Option(None, "--model", "-m", help="Converted folder, or a model of the store by NAME or "
                            "NAME:TYPE (default: $ACESTEP_GGUF_MODEL, else the demo model, converted on first use).")
QUANT_OPTION = typer.Option(None, "--quant", help="Language-model type (default: best present; with the demo model, "
                            "converted on demand).")
THREADS_OPTION = typer.Option(None, "--threads", min=1, help="CPU threads (default: all cores).")
GPU_LAYERS_OPTION = typer.Option("auto", "--gpu-layers", help="'auto' (planned from --vram) or a number of layers.")
VRAM_OPTION = typer.Option(None, "--vram", help="GPU memory budget with a unit, e.g. 12GiB (default: free VRAM).")
VERBOSE_OPTION = typer.Option(False, "--verbose", help="Show llama.cpp's own log.")
PARALLEL_OPTION = typer.Option("auto", "--parallel", help="Conversations decoded together, each with its own --ctx "
                               "(auto: 4, 2 or 1, as the KV caches fit; 1 = one at a time).")
CACHE_K_OPTION = typer.Option("f16", "--cache-type-k", help="KV cache K type: f16, q8_0 or q4_0 (less memory).")
CACHE_V_OPTION = typer.Option("f16", "--cache-type-v", help="KV cache V type: f16, q8_0 or q4_0 (quantized V "
                              "switches flash attention on).")


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
            err.print(f"{verb} {entry.file}  ({entry.role}, {entry.type}, {_size(entry.bytes)})")

    def note(self, text: str) -> None:
        if self.show_lines:
            note(f"note: {text}", style="yellow")


@app.command()
def convert(
    source: str = typer.Argument(..., help="Checkpoint folder or Hugging Face repo id (owner/name)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: ./<name>-gguf)."),
    quant: str = typer.Option("Q4_K_M", "--quant", "-q", help="Language-model types, comma-separated: Q2_K .. Q8_0, "
                              "IQ2_XXS .. IQ4_NL, F16, BF16 (README lists them), or 'all' (Q4_K_M, Q5_K_M, Q8_0)."),
    mmproj_quant: str = typer.Option("F16", "--mmproj-quant", help="Vision projector type: F16 or Q8_0."),
    name: Optional[str] = typer.Option(None, "--name", help="Base name of the output files (default: source name)."),
    force: bool = typer.Option(False, "--force", help="Redo outputs even when the manifest says they match."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Quantizer threads (default: all cores)."),
    via_llama_quantize: bool = typer.Option(False, "--via-llama-quantize", help="Write a lossless GGUF first and run "
                                            "llama.cpp's quantizer on it (the same files; slower, and needs "
                                            "temporary disk the size of the model)."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (llama-imatrix's GGUF, or a "
                                           "publisher's .imatrix / .dat) for the language model: needed by IQ2_*, "
                                           "IQ3_XXS, Q2_K_S; improves the other low-bit types."),
    calibrate: Optional[Path] = typer.Option(None, "--calibrate", help="A folder of pictures: make the F16 file, an "
                                             "importance matrix calibrated on them (kept as <name>.imatrix), then "
                                             "--quant with it."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="Print errors only."),
    verbose: bool = VERBOSE_OPTION,
):
    """Convert a llava-style safetensors checkpoint to GGUF (+ mmproj + manifest.json)."""
    from .convert import convert as run_convert
    with _errors(), _RichConvertProgress(err.is_terminal and not quiet and not as_json, not quiet and not as_json) as p:
        manifest = run_convert(source, out=out_dir, quant=quant, mmproj_quant=mmproj_quant, name=name, force=force,
                               threads=threads, verbose=verbose, progress=p, via_llama_quantize=via_llama_quantize,
                               imatrix=imatrix, calibrate=calibrate)
    if as_json:
        say(manifest.to_json(), end="")
    elif not quiet:
        folder = out_dir or Path(f"{manifest.name}-gguf")
        err.print(f"done: {folder}/manifest.json  (chat with: acestep-gguf chat IMAGE -m {folder})")


# -- imatrix ---------------------------------------------------------------------------------------
@app.command()
def imatrix(
    model: Path = typer.Argument(..., help="Converted folder or model name (its F16, BF16 or Q8_0 file is used)."),
    out: Path = typer.Option(..., "--out", "-o", help="The importance-matrix file to write (GGUF)."),
    images: Optional[Path] = typer.Option(None, "--images", help="A folder of pictures, each asked a built-in question."),
    conversations: Optional[Path] = typer.Option(None, "--conversations", help="JSON lines: {\"image\", \"question\", "
                                                 "\"answer\"}, picture paths relative to the file."),
    text: Optional[Path] = typer.Option(None, "--text", help="Plain text, in chunks of --chunk-size tokens (as "
                                        "llama-imatrix -f takes it)."),
    chunk_size: int = typer.Option(512, "--chunk-size", help="Tokens per text chunk (llama-imatrix -c)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Which file to calibrate on (default: F16, BF16, Q8_0)."),
    threads: Optional[int] = THREADS_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    verbose: bool = VERBOSE_OPTION,
):
    """Compute an importance matrix on pictures and text (for `convert --imatrix`, or llama-quantize)."""
    from .imatrix_tool import compute
    with _errors(), Progress(TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                             console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("calibrating", total=None)
        summary = compute(model, out, images=images, conversations=conversations, text=text, chunk_size=chunk_size,
                          quant=quant, threads=threads, verbose=verbose,
                          progress=lambda done, total: bar.update(task, completed=done, total=total),
                          plan=lambda line: note(line))
    if as_json:
        say(json.dumps(summary))
    else:
        err.print(f"wrote {summary['out']}: {summary['entries']} weights, {summary['chunks']} text chunks, "
                  f"{summary['conversations']} picture conversations (use: convert SOURCE --imatrix {summary['out']})")


# -- the model store -------------------------------------------------------------------------------
@app.command()
def pull(
    source: str = typer.Argument(..., help="Checkpoint folder or Hugging Face repo id (owner/name; the local cache "
                                 "with HF_HUB_OFFLINE=1)."),
    name: Optional[str] = typer.Option(None, "--name", help="Name in the store (default: the source's name)."),
    quant: str = typer.Option("Q4_K_M", "--quant", "-q", help="Language-model types, comma-separated, or 'all'."),
    mmproj_quant: str = typer.Option("F16", "--mmproj-quant", help="Vision projector type: F16 or Q8_0."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Quantizer threads (default: all cores)."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix for the low-bit types."),
    quiet: bool = typer.Option(False, "--quiet", help="Print errors only."),
):
    """Convert a checkpoint into the model store, under a name (`chat -m NAME`, `serve`)."""
    from .model_store import ModelStore, check_name
    from .convert.pipeline import _default_name
    with _errors():
        store = ModelStore()
        name = check_name(name if name is not None else _default_name(source, Path(source).expanduser()))
        with _RichConvertProgress(err.is_terminal and not quiet, not quiet) as p:
            model = store.pull(source, name, quant=quant, mmproj_quant=mmproj_quant, threads=threads, progress=p,
                               imatrix=imatrix)
    if not quiet:
        err.print(f"{model.name}: {', '.join(model.types())} in {model.folder}  (chat with: acestep-gguf chat IMAGE -m "
                  f"{model.name})")


@app.command("import")
def import_(
    model: Path = typer.Argument(..., help="The language-model .gguf file."),
    mmproj: Path = typer.Argument(..., help="Its mmproj .gguf file."),
    name: str = typer.Option(..., "--name", help="Name in the store."),
    copy: bool = typer.Option(False, "--copy", help="Copy the files (default: hard-link them when the store is on "
                              "the same file system, else copy)."),
):
    """Adopt a GGUF + mmproj pair made elsewhere (the Hub, llama.cpp's scripts), checked as `chat` checks it."""
    from .model_store import ModelStore
    with _errors():
        stored, how = ModelStore().import_pair(model, mmproj, name, copy=copy)
    err.print(f"{stored.name}: {how} {', '.join(f.file for f in stored.manifest.files)} into {stored.folder}")


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """The models in the store: name, family, types, size, when converted."""
    from .model_store import ModelStore
    with _errors():
        store = ModelStore()
        models, broken = store.list(), store.problems()
    if as_json:
        say(json.dumps({"store": str(store.root), "models": [m.as_dict() for m in models], "broken": broken}, indent=2))
        return
    if not models:
        note(f"no models in {store.root} (add one: acestep-gguf pull SOURCE --name NAME)")
    for m in models:
        say(f"{m.name:24} {m.family or '-':12} {','.join(m.types()):20} {_size(m.bytes):>10}  {m.as_dict()['modified']}")
    for name, why in broken.items():
        error_line(f"{name}: {why}")


@app.command("rm")
def rm(names: List[str] = typer.Argument(..., help="Model names.")):
    """Remove models from the store."""
    from .model_store import ModelStore
    with _errors():
        store = ModelStore()
        for name in names:
            removed = store.remove(name)
            err.print(f"removed {removed.name} ({_size(removed.bytes)})")


# -- chat ------------------------------------------------------------------------------------------
def _load_chat(model: Optional[Path], quant, ctx, threads, gpu_layers, vram, system, seed, verbose,
               cache_type_k: str = "f16", cache_type_v: str = "f16", parallel: int | str = 1):
    from .runtime import VisionChat
    if model is not None and model.is_file():
        raise OptionError(f"{model}: pass the converted folder (with manifest.json), not a single .gguf file")
    folder = model or default_model_folder(quant)
    session = VisionChat.load(folder, quant=quant, n_ctx=ctx, n_threads=threads, n_gpu_layers=gpu_layers_option(gpu_layers),
                              vram=vram, system=system, seed=seed, cache_type_k=cache_type_k,
                              cache_type_v=cache_type_v, parallel=parallel, verbose=verbose)
    if not session.exact_vision:
        note("warning: this llama-cpp-python build mis-orders llava image tokens (llama.cpp#25814); answers about "
             "images are degraded. Install with tools/build_llama_cpp.sh.", style="yellow")
    return session


def _usage(chat) -> dict:
    t = chat.last_turn
    return {"prompt_tokens": t.prompt_positions, "evaluated_tokens": t.evaluated_positions,
            "reused_tokens": t.reused_positions, "images_encoded": t.images_encoded,
            "completion_tokens": t.completion_tokens, "finish_reason": t.finish_reason}


@app.command()
def chat(
    images: List[str] = typer.Argument(None, help="Images for the first message (JPEG, PNG, WEBP)."),
    model: Optional[Path] = MODEL_OPTION,
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer this once and exit."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    quant: Optional[str] = QUANT_OPTION,
    max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="Longest reply, in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy (deterministic)."),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (with --temperature > 0)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Sampling seed (with --temperature > 0)."),
    ctx: int = typer.Option(8192, "--ctx", help="Context length in tokens (at least one image plus a prompt)."),
    threads: Optional[int] = THREADS_OPTION,
    gpu_layers: str = GPU_LAYERS_OPTION,
    vram: Optional[str] = VRAM_OPTION,
    as_json: bool = typer.Option(False, "--json", help="With -p: print one JSON object instead of streaming."),
    cache_type_k: str = CACHE_K_OPTION,
    cache_type_v: str = CACHE_V_OPTION,
    verbose: bool = VERBOSE_OPTION,
):
    """Ask about images: once with -p, or interactively (/help lists the commands; Ctrl-D ends)."""
    sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    with _errors():
        session = _load_chat(model, quant, ctx, threads, gpu_layers, vram, system, seed, verbose, cache_type_k,
                             cache_type_v)
        with session:
            if prompt is not None:
                _one_shot(session, prompt, images or [], sampling, as_json)
            else:
                _interactive(session, images or [], sampling)


def _one_shot(session, prompt, images, sampling, as_json):
    if as_json:
        text = session.ask(prompt, images, **sampling)
        t = session.last_turn
        say(json.dumps({"text": text, "model": str(session.model_path), "quant": session.quant,
                        "usage": _usage(session), "timings": {
                            "time_to_first_token_s": round(t.time_to_first_token_s, 4),
                            "decode_tokens_per_s": round(t.decode_tokens_per_s, 2)}}))
        return
    try:
        for piece in session.stream(prompt, images, **sampling):
            say(piece, end="")
    finally:
        say("")  # what was printed stays, on its own line, also when Ctrl-C ended it


HELP = """commands:
  /image PATH   attach an image to your next message (checked at once)
  /images       list the attached images
  /reset        start a new conversation
  /help         this list
  /quit         leave (Ctrl-D too)
a line starting with // is sent as a message beginning with /; Ctrl-C stops a reply"""


def _interactive(session, images, sampling):
    from .errors import ImageError
    pending = [session.prepare_image(img) for img in images]
    tty = sys.stdin.isatty()
    if tty:
        note(f"{session.model_path.name} — /help lists the commands; Ctrl-D ends")
    while True:
        if tty:
            err.print("> ", end="")
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            note("(use /quit or Ctrl-D to leave)")
            continue
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            command, _, arg = line.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/help":
                note(HELP, style="")
            elif command == "/reset":
                session.reset()
                pending = []
                note("conversation reset")
            elif command == "/images":
                note("\n".join(p.label for p in pending) or "no image attached")
            elif command == "/image":
                if not arg.strip():
                    error_line("/image needs a path")
                    continue
                try:
                    pending.append(session.prepare_image(arg.strip()))
                    note(f"attached {arg.strip()} (sent with your next message)")
                except ImageError as e:
                    error_line(str(e))
            else:
                error_line(f"unknown command {command} (type /help; start with // to send a message beginning with /)")
            continue
        message = line[1:] if line.startswith("//") else line
        try:
            for piece in session.stream(message, pending, **sampling):
                say(piece, end="")
            say("")
        except KeyboardInterrupt:
            say("")
            note("(reply stopped)")
        except AcestepGGUFError as e:  # a full context ends the turn, not the session
            say("")
            error_line(str(e))
        pending = []


# -- serve -----------------------------------------------------------------------------------------
@app.command()
def serve(
    model: Optional[Path] = MODEL_OPTION,
    quant: Optional[str] = QUANT_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; beyond loopback needs --api-key."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' "
                                          "(also from $ACESTEP_GGUF_API_KEY)."),
    ctx: int = typer.Option(8192, "--ctx", help="Context length in tokens."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads (default: all cores but one)."),
    gpu_layers: str = GPU_LAYERS_OPTION,
    vram: Optional[str] = VRAM_OPTION,
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where conversation states are kept across "
                                             "restarts (default: the user cache; 'none' keeps them in memory only)."),
    cache_size: str = typer.Option("4GiB", "--cache-size", help="Room for saved conversation states, with a unit."),
    max_image_bytes: str = typer.Option("16MiB", "--max-image-bytes", help="Largest image a request may send."),
    cors_origin: List[str] = typer.Option([], "--cors-origin", help="Allow browser pages from this origin (repeatable)."),
    allowed_host: List[str] = typer.Option([], "--allowed-host", help="Also answer requests addressed to this host "
                                           "name (repeatable; loopback names always)."),
    body_timeout: float = typer.Option(30.0, "--body-timeout", min=0.1, max=3600, help="Seconds a client may take to "
                                       "send a request body (slower: 408)."),
    models: Optional[Path] = typer.Option(None, "--models", help="Serve every model of this store folder (default "
                                          "without -m: the model store, if it holds any; else the demo model)."),
    max_loaded: int = typer.Option(1, "--max-loaded", min=1, max=64, help="With a store: models kept loaded at once."),
    keep_alive: str = typer.Option("5m", "--keep-alive", help="With a store: how long a model stays loaded after use "
                                   "(30s, 5m, 1h; 0 = unload at once; -1 = forever). Requests may say otherwise."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="With a store: memory for loaded models, "
                                             "with a unit (default: 3/4 of RAM)."),
    cache_type_k: str = CACHE_K_OPTION,
    cache_type_v: str = CACHE_V_OPTION,
    parallel: str = typer.Option("auto", "--parallel", help="Slots: requests answered at once, decoded together, "
                                  "each with its own --ctx (auto: 4, 2 or 1, as the KV caches fit)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show llama.cpp's own log and every request."),
):
    """Serve the model over HTTP: OpenAI and Ollama APIs and a chat page at http://HOST:PORT/."""
    from .demo import cache_folder
    from .runtime.offload import parse_size
    from .server import serve as run_server
    with _errors():
        from .model_store import ModelStore
        store = ModelStore(models)
        if model is None and models is None and not store.list():
            model = default_model_folder(quant)  # an empty store: the demo model, as before
        folder = model
        states = None if str(cache_dir).lower() == "none" else (cache_dir or cache_folder() / "kv-cache")
        what = folder if folder is not None else f"the models in {store.root}"
        err.print(f"serving {what} on http://{host}:{port}/ (OpenAI: /v1, Ollama: /api; Ctrl-C stops)")
        run_server(folder, quant=quant, host=host, port=port, api_key=api_key, n_ctx=ctx, n_threads=threads,
                   n_gpu_layers=gpu_layers_option(gpu_layers), vram=vram, cache_dir=states,
                   cache_size=parse_size(cache_size, "--cache-size"),
                   max_image_bytes=parse_size(max_image_bytes, "--max-image-bytes"), cors_origins=cors_origin,
                   allowed_hosts=allowed_host, body_timeout_s=body_timeout, models=models, max_loaded=max_loaded,
                   keep_alive=keep_alive, max_memory=parse_size(max_memory, "--max-memory") if max_memory else None,
                   cache_type_k=cache_type_k, cache_type_v=cache_type_v, parallel=parallel_option(parallel),
                   verbose=verbose)


# -- caption ---------------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@app.command()
def caption(
    inputs: List[Path] = typer.Argument(..., help="Image files and/or folders (searched for .jpg .png .webp)."),
    prompt: str = typer.Option("Describe this image.", "--prompt", "-p", help="The question asked of every image."),
    out_file: Path = typer.Option(..., "--out", "-o", help="JSON-lines file; images already in it are skipped."),
    model: Optional[Path] = MODEL_OPTION,
    quant: Optional[str] = QUANT_OPTION,
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Longest caption, in tokens."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Try images recorded as failed again."),
    ctx: int = typer.Option(4096, "--ctx", help="Context length in tokens."),
    threads: Optional[int] = THREADS_OPTION,
    gpu_layers: str = GPU_LAYERS_OPTION,
    vram: Optional[str] = VRAM_OPTION,
    ray_address: Optional[str] = typer.Option(None, "--ray", help="Caption on a Ray cluster: 'local' (started for the "
                                              "run), 'auto', or an address such as ray://head:10001."),
    workers: int = typer.Option(2, "--workers", min=1, help="With --ray: actors, each holding one loaded model."),
    cpus_per_worker: int = typer.Option(1, "--cpus-per-worker", min=1, help="With --ray: CPUs (threads) per actor."),
    gpus_per_worker: float = typer.Option(0, "--gpus-per-worker", min=0, help="With --ray: GPUs per actor (offload)."),
    model_sha256: Optional[str] = typer.Option(None, "--model-sha256", help="With --ray: the manifest.json sha256 every "
                                               "worker must have (default: the driver's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    parallel: str = PARALLEL_OPTION,
    cache_type_k: str = CACHE_K_OPTION,
    cache_type_v: str = CACHE_V_OPTION,
    verbose: bool = VERBOSE_OPTION,
):
    """Caption many images with one loaded model (or a Ray cluster of them); resumable, exactly one
    line per image in input order, bad images recorded once. --parallel pictures are decoded together
    (per worker with --ray)."""
    from .runtime.caption import caption_images, collect_images
    with _errors():
        files = collect_images(inputs, IMAGE_SUFFIXES)
        columns = (TextColumn("captioning"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeRemainingColumn())
        with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
            task = bar.add_task("captioning", total=len(files), rate="")
            if ray_address is not None:
                from .runtime.model_files import store_reference
                from .runtime.ray_caption import caption_with_ray
                folder, quant = store_reference(model or default_model_folder(quant), quant)  # a name: its folder

                def progress(p):
                    bar.update(task, advance=1, rate=f"{p['images_per_s']:.2f} img/s, {p['failed']} failed")
                summary = caption_with_ray(folder, files, prompt, out_file,
                                           address=None if ray_address == "local" else ray_address, workers=workers,
                                           cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, quant=quant,
                                           n_ctx=ctx, max_tokens=max_tokens, retry_failed=retry_failed,
                                           expected_sha256=model_sha256, on_progress=progress,
                                           cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                                           parallel=parallel_option(parallel))
            else:
                session = _load_chat(model, quant, ctx, threads, gpu_layers, vram, None, None, verbose, cache_type_k,
                                     cache_type_v, parallel_option(parallel))
                with session:
                    summary = caption_images(session, files, prompt, out_file, max_tokens=max_tokens,
                                             retry_failed=retry_failed, on_image=lambda record: bar.advance(task))
    if as_json:
        say(json.dumps({**summary, "out": str(out_file)}))
    else:
        err.print(f"{summary['captioned']} captioned, {summary['skipped']} already done, {summary['failed']} failed "
                  f"→ {out_file}")


# -- plan ------------------------------------------------------------------------------------------
@app.command()
def plan(
    model: Optional[Path] = typer.Argument(None, help="Converted folder or language-model .gguf file."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Plan for a model card instead: ace-step-1.5, llava-1.5-7b, llava-1.5-13b, "
                                          "llava-v1.6-mistral-7b, llava-v1.6-vicuna-7b, llava-v1.6-vicuna-13b or llava-v1.6-34b."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Language-model type (with --preset: default Q4_K_M)."),
    mmproj_quant: str = typer.Option("F16", "--mmproj-quant", help="Vision projector type for --preset: F16 or Q8_0."),
    vram: str = typer.Option("12GiB", "--vram", help="GPU memory budget with a unit: 12GiB, 11.5GB, 800MiB."),
    ctx: int = typer.Option(8192, "--ctx", min=1, help="Context length in tokens."),
    parallel: int = typer.Option(1, "--parallel", min=1, max=MAX_PARALLEL, help="Conversations decoded together (caption and "
                                 "serve --parallel), each with its own --ctx of KV cache."),
    cache_type_k: str = CACHE_K_OPTION,
    cache_type_v: str = CACHE_V_OPTION,
    best: bool = typer.Option(False, "--best", help="Find the largest type that puts every layer on the GPU (with "
                              "--preset: every type; with a folder: the types it holds)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (sizes in bytes)."),
):
    """How many layers fit on the GPU: weights, KV cache, compute buffers, mmproj, margin."""
    import llama_cpp

    from .runtime import offload
    from .runtime.model_files import resolve
    with _errors():
        from .quant_types import BY_QUALITY
        from .runtime.kv_cache_types import CacheTypes
        budget = offload.parse_size(vram)
        cache = CacheTypes.parse(cache_type_k, cache_type_v)
        positions = ctx * parallel  # each sequence has a KV cache of its own
        chosen = None
        if best:
            if preset:
                def shape_of(t):
                    return offload.shape_from_preset(preset, t, mmproj_quant.upper())
                candidates = BY_QUALITY
            elif model is not None and not model.is_file():
                from .manifest import Manifest
                from .runtime.model_files import store_reference
                folder = store_reference(model)[0]
                present = {f.type for f in Manifest.read(folder).files if f.role == "language"}
                candidates = [t for t in BY_QUALITY if t in present]

                def shape_of(t):
                    files = resolve(folder, quant=t)
                    return offload.shape_from_gguf(files.model, files.mmproj)
            else:
                raise OptionError("--best needs --preset NAME or a converted folder / model name")
            if not candidates:
                raise OptionError(f"{model}: holds no quantized type to choose from")
            chosen, result = offload.best_fit(shape_of, candidates, budget, positions, cache)
            quant = chosen or candidates[-1]
            what = f"{preset or model} {quant}"
        elif preset:
            shape = offload.shape_from_preset(preset, (quant or "Q4_K_M").upper(), mmproj_quant.upper())
            what = f"{preset} {(quant or 'Q4_K_M').upper()} (model card)"
        elif model is not None:
            if model.is_file():
                shape, what = offload.shape_from_gguf(model, None), model.name
            else:
                files = resolve(model, quant=quant)
                shape, what = offload.shape_from_gguf(files.model, files.mmproj), files.model.name
        else:
            raise OptionError("give a model folder / .gguf file, or --preset ace-step-1.5")
        if not best:
            result = offload.plan(shape, budget, positions, gpu_available=True, cache=cache)
    if as_json:
        say(json.dumps({**result.to_dict(), **({"best": chosen, "type": quant} if best else {})}))
        return
    size = offload.size_formatter(vram)
    at = f"{ctx} context" + (f" x {parallel} conversations" if parallel > 1 else "")
    table = Table(title=f"{what}: {result.n_gpu_layers} GPU layers for {vram} at {at}", title_justify="left")
    table.add_column("item")
    table.add_column("GPU", justify="right")
    table.add_column("CPU", justify="right")
    cpu_weights = result.language_weights_bytes - result.gpu_weights_bytes
    for label, gpu, cpu in (("language weights", result.gpu_weights_bytes, cpu_weights),
                            (f"KV cache ({cache})", result.kv_cache_bytes, result.kv_cache_total_bytes - result.kv_cache_bytes),
                            ("compute buffer", result.compute_bytes, 0), ("mmproj weights", result.mmproj_bytes, 0),
                            ("mmproj activations (1 image)", result.mmproj_compute_bytes, 0),
                            ("safety margin", result.margin_bytes, 0)):
        table.add_row(label, size(gpu), size(cpu) if cpu else "")
    table.add_row("headroom", size(result.headroom_bytes), "")
    out.print(table)
    where = "GPU" if result.output_on_gpu else "CPU"
    say(f"--gpu-layers {result.n_gpu_layers}: {result.reason}; output layer on the {where}")
    if result.image_tokens:
        room = "" if ctx > result.image_tokens else " — too small a --ctx for one picture"
        say(f"one picture takes up to {result.image_tokens} of the {ctx} context positions{room}")
    if best:
        from .quant_types import TYPES
        hint = " (it needs an importance matrix: convert --imatrix FILE)" if chosen and TYPES[chosen].needs_imatrix else ""
        say(f"best: {chosen} puts every layer on the GPU{hint}" if chosen else
            f"best: no type puts every layer on the GPU at --ctx {ctx}; the smallest, {quant}, puts "
            f"{result.n_gpu_layers} of {result.n_layers + 1} (try a quantized KV cache or a shorter --ctx)")
    if not llama_cpp.llama_supports_gpu_offload():
        say("note: this llama-cpp-python build is CPU-only; `chat --gpu-layers auto` will use 0 here "
            "(see README: building with CUDA)")


# -- info ------------------------------------------------------------------------------------------
@app.command()
def info(file: Path = typer.Argument(..., help="A .gguf file (language model or mmproj)."),
         as_json: bool = typer.Option(False, "--json", help="Print the facts as JSON.")):
    """Architecture, type, size, tokenizer, template and vision settings of a GGUF file, and whether
    it passes the checks made before loading."""
    from .runtime.inspect import describe
    with _errors():
        facts = describe(file)
    if as_json:
        say(json.dumps(facts))
        return
    for key, value in facts.items():
        out.print(Text.assemble((f"{key}", "bold"), f": {value}"))


# -- demo ------------------------------------------------------------------------------------------
@app.command()
def demo(
    image: Optional[str] = typer.Argument(None, help="An image to ask about (default: a freshly drawn one)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The question (default: a random one)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the drawn picture and question."),
    quant: str = typer.Option("Q8_0", "--quant", help="Demo model type: Q4_K_M, Q5_K_M, Q8_0, F16 or BF16."),
    hard: bool = typer.Option(False, "--hard", help="Draw from the training range instead: tiny or tinted "
                              "shapes, 1:4 pictures, blur (see the model's limits)."),
    verbose: bool = VERBOSE_OPTION,
):
    """Convert the bundled demo model (once), draw a clear picture of shapes, and ask about it."""
    from . import demo as demo_lib
    with _errors():
        with err.status("preparing the demo model (first run converts it)…"):
            folder = demo_lib.ensure_demo_model(quant)
        result = demo_lib.run_demo(folder, image=image, prompt=prompt, seed=seed, quant=quant, verbose=verbose,
                                   hard=hard)
    say(f"image:    {result['image']}")
    say(f"question: {result['question']}")
    say(f"answer:   {result['answer']}")
    if result.get("expected"):
        say(f"expected: {result['expected']}")
        if result["answer"] != result["expected"]:
            note("(the answer differs from the expected one)", style="yellow")


@app.command()
def version():
    """Print the versions of acestep-gguf and llama-cpp-python."""
    import llama_cpp
    say(f"acestep-gguf {__version__}, llama-cpp-python {llama_cpp.__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
