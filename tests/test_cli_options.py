"""The command line's own promises: text printed literally, option values checked with one clear line,
sizes with units shown in the unit given, help text on every option."""

from __future__ import annotations

import json
import re

import pytest
from gguf import GGUFValueType as T
from hostile import rewrite_gguf
from test_cli import cli

from acestep_gguf.cli import app
from acestep_gguf.runtime.chat import VisionChat

MARKUP = "[/INST] [bold]not bold[/bold] :smile: [red]x"


def test_model_output_is_printed_literally(converted, noise_image, monkeypatch):
    def stream(self, prompt, images=(), **sampling):
        yield from ("Sure: ", MARKUP)  # what a model might well say
    monkeypatch.setattr(VisionChat, "stream", stream)
    result = cli("chat", noise_image, "-m", converted, "-p", "Hi")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Sure: {MARKUP}\n"


def test_templates_file_names_and_errors_are_printed_literally(tmp_path, converted):
    path = tmp_path / "m.gguf"
    rewrite_gguf(converted / "tiny-llava-F16.gguf", path, fields={"general.name": (MARKUP, T.STRING, None)})
    info = cli("info", path)
    assert info.exit_code == 0 and f"name: {MARKUP}" in info.stdout
    odd = tmp_path / "[red]picture[bold] :smile:.png"
    odd.write_text("not an image")
    result = cli("chat", odd, "-m", converted, "-p", "Hi")
    assert result.exit_code == 1 and f"error: {odd}: not a JPEG, PNG or WEBP image" in result.stderr


@pytest.mark.parametrize("args,needle", [
    (["--gpu-layers", "many"], "--gpu-layers 'many': use 'auto' or a whole number"),
    (["--gpu-layers", "-2"], "--gpu-layers -2: the number of layers cannot be negative"),
    (["--ctx", "10"], "n_ctx 10: one image takes 16 positions"),
    (["--vram", "12", "--gpu-layers", "auto"], "--vram '12': give a size with a unit"),
])
def test_chat_option_values_are_checked(converted, noise_image, args, needle):
    result = cli("chat", noise_image, "-m", converted, "-p", "Hi", *args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.output


def test_plan_takes_units_and_answers_in_them(converted):
    binary = cli("plan", converted, "--vram", "4GiB")
    assert binary.exit_code == 0 and "GiB" in binary.stdout and " GB" not in binary.stdout
    decimal = cli("plan", converted, "--vram", "4GB")
    assert decimal.exit_code == 0 and " GB" in decimal.stdout and "GiB" not in decimal.stdout
    bare = cli("plan", converted, "--vram", "12")
    assert bare.exit_code == 1 and "give a size with a unit" in bare.stderr
    data = json.loads(cli("plan", converted, "--vram", "4GiB", "--json").stdout)
    assert data["vram_budget_bytes"] == 4 << 30


def test_every_option_has_help_text_and_flags_take_no_value():
    import typer.main
    group = typer.main.get_command(app)
    helps = {name: cli(name, "--help").stdout for name in group.commands}
    undocumented = [f"{name} {p.opts[0]}" for name, command in group.commands.items() for p in command.params
                    if p.param_type_name == "option" and p.name != "help" and not p.help]
    assert len(helps) >= 7 and undocumented == []
    assert [name for name, text in helps.items() if "<bool>" in text or "Show this message" not in text] == []
    assert re.search(r"--json\s+Print the manifest as JSON", helps["convert"])  # a flag, no value after it


def test_sizes_are_shown_in_the_unit_given(tmp_path):
    from acestep_gguf.runtime.offload import size_formatter
    assert size_formatter("12GiB")(12 << 30) == "12.00 GiB"
    assert size_formatter("11.5GB")(11_500_000_000) == "11.50 GB"
    assert size_formatter("800MiB")(800 << 20) == "0.78 GiB"


def test_the_demo_quant_option_is_checked(tmp_path):
    result = cli("demo", "--quant", "Q3_X", env={"ACESTEP_GGUF_CACHE": str(tmp_path / "c")})
    assert result.exit_code == 1 and "--quant Q3_X: unknown type" in result.stderr
