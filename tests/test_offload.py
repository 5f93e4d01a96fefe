"""The offload planner against hand-computed numbers: a real GGUF, and the ACE-Step 1.5 32B card."""

from __future__ import annotations

import json

import pytest
from gguf import GGUFReader
from hostile import cli_process, one_error_line
from typer.testing import CliRunner

from acestep_gguf.cli import app
from acestep_gguf.runtime.offload import (MARGIN_FIXED, parse_size, plan, shape_from_gguf, shape_from_preset)

GIB = 1 << 30


def test_sizes_parse():
    assert parse_size("12GiB") == 12 * GIB == parse_size("12G") == parse_size("12 gib")
    assert parse_size("11.5GB") == 11_500_000_000 and parse_size("800MiB") == 800 << 20 and parse_size(1234) == 1234


def test_preset_q4_k_m_matches_the_published_qwen2_5_32b_size():
    shape = shape_from_preset("ace-step-1.5", "Q4_K_M")
    total = sum(shape.layer_bytes) + sum(shape.other_bytes.values())
    assert total == pytest.approx(19.85e9, rel=0.003)  # bartowski/Qwen2.5-32B-Instruct-GGUF Q4_K_M: 19.85 GB
    assert len(shape.layer_bytes) == 64
    q8 = shape_from_preset("ace-step-1.5", "Q8_0")
    assert sum(q8.layer_bytes) + sum(q8.other_bytes.values()) == pytest.approx(34.82e9, rel=0.003)


def test_preset_plan_for_a_12_gib_card_by_hand():
    shape = shape_from_preset("ace-step-1.5", "Q4_K_M")
    result = plan(shape, 12 * GIB, 8192)
    kv_layer = 2 * 8 * 128 * 2 * 8192  # K and V, 8 KV heads x 128, F16, 8K context = 32 MiB
    compute = 4 * 512 * (152064 + 40 * 8192 + 2 * 27648 + 4 * 5120)  # logits, scores, FFN, residual (F32)
    mm_act = 4 * (2 * 1025 * (5120 + 4 * 1280) + 16 * 1025 ** 2)  # one 448 px image through ViT-H/14
    margin = MARGIN_FIXED + int(0.05 * 12 * GIB)
    assert (kv_layer, compute, mm_act) == (32 << 20, 1_137_704_960, 151_208_000)
    assert result.kv_cache_bytes == 27 * kv_layer and result.kv_cache_total_bytes == 64 * kv_layer == 2 * GIB
    assert result.compute_bytes == compute and result.margin_bytes == margin
    assert result.mmproj_compute_bytes == mm_act
    # docs/offload.md: 27 of the 64 layers fit a 12 GiB card at 8K context; the 28th would not
    assert result.n_gpu_layers == 27 and not result.output_on_gpu
    fixed = compute + shape.mmproj_bytes + mm_act + margin
    used = fixed + sum(shape.layer_bytes[:27]) + 27 * kv_layer
    assert used <= 12 * GIB < used + shape.layer_bytes[27] + kv_layer
    assert result.headroom_bytes == 12 * GIB - used


def test_plan_of_a_real_gguf(converted):
    model, mmproj = converted / "tiny-llava-Q8_0.gguf", converted / "mmproj-tiny-llava-F16.gguf"
    shape = shape_from_gguf(model, mmproj)
    reader = GGUFReader(model)
    per_layer = [sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith(f"blk.{i}.")) for i in range(2)]
    assert shape.layer_bytes == per_layer
    assert shape.mmproj_bytes == sum(int(t.n_bytes) for t in GGUFReader(mmproj).tensors)
    big = plan(shape, 8 * GIB, 1024)
    assert big.n_gpu_layers == 3 and big.output_on_gpu  # 2 layers + output layer
    assert big.language_weights_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    none = plan(shape, 256 << 20, 1024)
    assert none.n_gpu_layers == 0 and "does not cover" in none.reason
    cpu = plan(shape, 8 * GIB, 1024, gpu_available=False)
    assert cpu.n_gpu_layers == 0 and "no GPU support" in cpu.reason


def test_plan_command_json_and_table(converted):
    runner = CliRunner()
    result = runner.invoke(app, ["plan", "--preset", "ace-step-1.5", "--quant", "Q4_K_M", "--vram", "12GiB",
                                 "--ctx", "8192", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("n_layers", "n_gpu_layers", "language_weights_bytes", "kv_cache_bytes", "mmproj_bytes",
                "compute_bytes", "vram_budget_bytes", "headroom_bytes"):
        assert key in data
    assert data["n_layers"] == 64 and data["vram_budget_bytes"] == 12 * GIB
    table = runner.invoke(app, ["plan", str(converted), "--vram", "4GiB"])
    assert table.exit_code == 0 and "KV cache" in table.stdout and "--gpu-layers 3: 2 of 2 layers fit plus the output layer" in table.stdout
    bad = runner.invoke(app, ["plan", "--preset", "ace-step-1.5", "--vram", "twelve"])
    assert bad.exit_code == 1 and "--vram" in bad.stderr


@pytest.mark.parametrize("preset,published,mmproj", [("llava-1.5-7b", 4.08e9, 624e6), ("llava-1.5-13b", 7.87e9, 645e6)])
def test_llava_presets_match_published_llama_2_sizes(preset, published, mmproj):
    """Q4_K_M files of Llama-2-7B / 13B (TheBloke's GGUF): 4.08 / 7.87 GB; LLaVA-1.5's F16 mmproj
    (CLIP ViT-L/14-336, 23 layers run, projector to 4096 / 5120): 624 / 645 MB."""
    shape = shape_from_preset(preset, "Q4_K_M")
    total = sum(shape.layer_bytes) + sum(shape.other_bytes.values())
    assert total == pytest.approx(published, rel=0.005)
    assert shape.mmproj_bytes == pytest.approx(mmproj, rel=0.01) and shape.v_n_pos == 577
    runner = CliRunner()
    result = runner.invoke(app, ["plan", "--preset", preset, "--vram", "24GiB", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["output_on_gpu"] is True


PUBLISHED_32B = {"IQ2_XS": 9.96, "IQ2_M": 11.3, "Q2_K": 12.3, "IQ3_XXS": 12.8, "IQ3_M": 14.8, "Q3_K_M": 16.0,
                 "IQ4_XS": 17.7, "Q4_K_M": 19.9}  # GB, Qwen2.5-32B-Instruct files


def test_preset_sizes_follow_llama_cpps_type_rules_within_one_percent_of_published_files():
    """The ace-step-1.5 card's language model, each tensor in the type llama.cpp's rules give it, against
    the published Qwen2.5-32B-Instruct GGUF sizes (mradermacher; imatrix files, which for these types
    change only IQ4_XS's first ffn_down layers)."""
    from acestep_gguf.models.presets import PRESETS, language_tensor_bytes
    for quant, published in PUBLISHED_32B.items():
        layers, other = language_tensor_bytes(PRESETS["ace-step-1.5"], quant)
        ours = (sum(layers) + sum(other.values())) / 1e9
        assert abs(ours - published) / published < 0.01, (quant, ours, published)


def test_plan_best_finds_the_largest_type_that_fits():
    done = cli_process("plan", "--preset", "ace-step-1.5", "--vram", "24GiB", "--ctx", "8192", "--best", "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["best"] == "Q4_K_M" and found["n_gpu_layers"] >= found["n_layers"]
    larger = cli_process("plan", "--preset", "ace-step-1.5", "--quant", "Q5_K_S", "--vram", "24GiB", "--ctx", "8192",
                         "--json")
    assert json.loads(larger.stdout)["n_gpu_layers"] < 64  # the next type up does not fit
    # the card's promise: the whole 32B on a 12 GB card, with IQ2_XS, a Q8_0 KV cache and a Q8_0 mmproj
    card = cli_process("plan", "--preset", "ace-step-1.5", "--mmproj-quant", "Q8_0", "--cache-type-k", "q8_0",
                       "--cache-type-v", "q8_0", "--vram", "12GiB", "--ctx", "4096", "--best")
    assert "best: IQ2_XS puts every layer on the GPU (it needs an importance matrix" in card.stdout
    none = cli_process("plan", "--preset", "ace-step-1.5", "--vram", "12GiB", "--ctx", "8192", "--best")
    assert none.returncode == 0 and "no type puts every layer on the GPU" in none.stdout and "IQ2_XXS" in none.stdout


def test_types_that_need_an_importance_matrix_are_refused_in_one_line(tmp_path, tiny_checkpoint):
    one_error_line(cli_process("convert", tiny_checkpoint, "--out", tmp_path / "o", "--quant", "IQ2_XS"),
                   "only with an importance matrix", "--imatrix FILE")


@pytest.mark.parametrize("quant, vram_gib, ram_gib, expected", [
    ("Q4_K_M", 12, 64, 1),   # the 32B does not fit a 12 GB card: another sequence's KV would push layers off it
    ("Q4_K_M", 24, 64, 2),   # all 65 fit with two sequences; four would cost three layers
    ("IQ2_XS", 24, 8, 4),    # the whole KV on the card: host RAM does not matter
    ("Q4_K_M", 0, 64, 4),    # CPU only: four 4096-position Q8_0 caches (2.1 GiB) within a quarter of 64 GiB
    ("Q4_K_M", 0, 8, 2),     # ... but not of 8 GiB
])
def test_auto_parallel_never_costs_a_gpu_layer_or_much_ram(quant, vram_gib, ram_gib, expected):
    from acestep_gguf.runtime.kv_cache_types import CacheTypes
    from acestep_gguf.runtime.offload import auto_parallel
    shape, cache = shape_from_preset("ace-step-1.5", quant), CacheTypes.parse("q8_0", "q8_0")
    chosen = auto_parallel(lambda n: plan(shape, vram_gib << 30, 4096 * n, vram_gib > 0, cache), ram_gib << 30)
    assert chosen == expected


def test_plan_with_several_conversations_counts_a_kv_cache_for_each():
    def planned(*extra):
        result = CliRunner().invoke(app, ["plan", "--preset", "ace-step-1.5", "--vram", "24GiB", "--ctx", "4096",
                                          "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)
    one, four = planned(), planned("--parallel", "4")
    assert four["kv_cache_total_bytes"] == 4 * one["kv_cache_total_bytes"]
    assert four["n_gpu_layers"] < one["n_gpu_layers"]
