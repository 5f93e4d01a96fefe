"""Models by name: the store (pull, import, list, rm; NAME and NAME:TYPE wherever a model is taken) and
one server for all of it, driven by the official `ollama` and `openai` clients: listing, switching
models per request, loading and unloading within --max-loaded and keep_alive, per-model caches that
survive a switch, /api/pull, /api/delete. A pair written by llama.cpp's own converter is adopted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import LLAMA_TOKENIZER_CONFIG, build_model, save_checkpoint, tiny_llama_config
from hostile import cli_process, one_error_line
from spm_vocab import DATA, llama_tokenizer_json
from test_hub_cache import hub_cache  # noqa: F401 (a fixture)
from test_server import QUESTION, Server, user
from test_server_page import browser  # noqa: F401 (a fixture)
from tokenizers import Tokenizer

from acestep_gguf.demo import DEMO_CHECKPOINT
from acestep_gguf.model_store import ModelStore


@pytest.fixture(scope="module")
def llava_checkpoint(tmp_path_factory) -> Path:
    """A tiny LLaVA-1.5-family checkpoint whose vocabulary has exactly the tokenizer's 32002 entries
    (llama.cpp's converter writes the tokenizer's count, and llama.cpp checks the embedding against it)."""
    spm = Tokenizer.from_str(json.dumps(llama_tokenizer_json()))
    model = build_model(tiny_llama_config(spm, "llama", n_vocab=32002))
    return save_checkpoint(model, spm, tmp_path_factory.mktemp("llava") / "tiny-llava15", style="hub4",
                           tokenizer_config=LLAMA_TOKENIZER_CONFIG)


@pytest.fixture(scope="module")
def store(tmp_path_factory, llava_checkpoint) -> Path:
    """Three models: the demo model under two names of different types, and a LLaVA-1.5-family one."""
    root = tmp_path_factory.mktemp("store")
    s = ModelStore(root)
    s.pull(DEMO_CHECKPOINT, "demo-q8", quant="Q8_0")
    s.pull(DEMO_CHECKPOINT, "demo-q4", quant="Q4_K_M")
    s.pull(llava_checkpoint, "llava", quant="Q8_0")
    return root


def cli(*args, root: Path, **kw):
    return cli_process(*args, env={"ACESTEP_GGUF_MODELS": str(root)}, **kw)


def test_list_and_names_everywhere(store, noise_image):
    listed = json.loads(cli("list", "--json", root=store).stdout)
    assert [(m["name"], m["family"], m["types"]) for m in listed["models"]] == [
        ("demo-q4", "llava_qwen2", ["Q4_K_M"]), ("demo-q8", "llava_qwen2", ["Q8_0"]), ("llava", "llava_llama", ["Q8_0"])]
    by_name = cli("chat", noise_image, "-m", "demo-q8", "-p", "What shape is this?", "--max-tokens", "8", root=store)
    by_folder = cli("chat", noise_image, "-m", store / "demo-q8", "-p", "What shape is this?", "--max-tokens", "8",
                    root=store)
    assert by_name.returncode == 0 and by_name.stdout == by_folder.stdout and by_name.stdout.strip()
    assert cli("chat", noise_image, "-m", "demo-q8:Q8_0", "-p", "Hi", "--max-tokens", "2", root=store).returncode == 0
    one_error_line(cli("chat", noise_image, "-m", "demo-q8:Q4_K_M", "-p", "x", root=store), "has no Q4_K_M file")
    one_error_line(cli("chat", noise_image, "-m", "nosuch", "-p", "x", root=store), "'nosuch' is not in the store",
                   "demo-q4, demo-q8, llava")
    plan = cli("plan", "demo-q4", "--vram", "1GiB", "--json", root=store)
    assert plan.returncode == 0 and json.loads(plan.stdout)["n_layers"] == 2
    from acestep_gguf import VisionChat
    os.environ["ACESTEP_GGUF_MODELS"] = str(store)
    try:
        with VisionChat.load("demo-q4:Q4_K_M", n_gpu_layers=0) as chat:
            assert chat.quant == "Q4_K_M"
    finally:
        del os.environ["ACESTEP_GGUF_MODELS"]


@pytest.mark.parametrize("bad", ["../x", "a/b", ".hidden", "", "x" * 65, "name:with:colons", "-dash"])
def test_bad_names_are_one_line(tmp_path, bad):
    done = cli("pull", DEMO_CHECKPOINT, "--name", bad, "--quant", "Q8_0", root=tmp_path)
    one_error_line(done, "model name")
    assert not any(tmp_path.iterdir()) or all(p.name.startswith(".") for p in tmp_path.iterdir())


def test_pull_import_rm_and_broken_entries(tmp_path, llava_checkpoint, noise_image):
    root = tmp_path / "store"
    assert cli("pull", DEMO_CHECKPOINT, "--name", "demo", "--quant", "Q8_0", root=root).returncode == 0
    assert cli("pull", DEMO_CHECKPOINT, "--name", "demo", "--quant", "Q4_K_M", root=root).returncode == 0  # adds a type
    assert json.loads(cli("list", "--json", root=root).stdout)["models"][0]["types"] == ["Q4_K_M", "Q8_0"]
    # a pull of the same name while another runs is refused at once
    with ModelStore(root).locked("demo"):
        one_error_line(cli("pull", DEMO_CHECKPOINT, "--name", "demo", root=root), "another pull")
    # files deleted or damaged under a model: list names it, using it is one line, others are unharmed
    assert cli("pull", DEMO_CHECKPOINT, "--name", "other", "--quant", "Q8_0", root=root).returncode == 0
    (root / "demo" / "demo-Q8_0.gguf").unlink()
    listed = json.loads(cli("list", "--json", root=root).stdout)
    assert [m["name"] for m in listed["models"]] == ["other"] and "demo-Q8_0.gguf is missing" in listed["broken"]["demo"]
    one_error_line(cli("chat", noise_image, "-m", "demo", "-p", "x", root=root), "demo-Q8_0.gguf is missing")
    (root / "other" / "manifest.json").write_text("{not json")
    one_error_line(cli("chat", noise_image, "-m", "other", "-p", "x", root=root), "manifest.json")
    assert cli("rm", "demo", "other", root=root).returncode == 0
    assert json.loads(cli("list", "--json", root=root).stdout) == {"store": str(root), "models": [], "broken": {}}
    one_error_line(cli("rm", "demo", root=root), "not in the store")


def test_an_interrupted_pull_leaves_no_half_model(tmp_path):
    root = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "acestep_gguf", "pull", str(DEMO_CHECKPOINT), "--name", "half",
                             "--quant", "all"], env={**os.environ, "ACESTEP_GGUF_MODELS": str(root)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list(root.glob(".partial-half-*/*.partial")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    assert json.loads(cli("list", "--json", root=root).stdout)["models"] == []
    assert cli("pull", DEMO_CHECKPOINT, "--name", "half", "--quant", "Q8_0", root=root).returncode == 0
    assert [m["name"] for m in json.loads(cli("list", "--json", root=root).stdout)["models"]] == ["half"]
    assert not list(root.glob(".partial-*"))  # the killed run's leftovers went with the next pull


def test_a_pair_written_by_llama_cpps_own_converter_is_adopted(tmp_path, llava_checkpoint, noise_image):
    """llama.cpp's convert_hf_to_gguf.py (from the vendored tree of the pinned llama-cpp-python) writes the
    text model; its mmproj is ours (llama.cpp's converter has no CLIP-llava mmproj path). Adopted by
    name, it answers as the same checkpoint converted by us."""
    script = DATA / "llama.cpp-convert" / "convert_hf_to_gguf.py"
    if not script.is_file():
        pytest.fail(f"{script} missing; run tools/build_llama_cpp.sh (the README's setup step)")
    theirs = tmp_path / "theirs-f16.gguf"
    done = subprocess.run([sys.executable, str(script), str(llava_checkpoint), "--outfile", str(theirs), "--outtype",
                           "f16"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = tmp_path / "ours"
    root = tmp_path / "store"
    assert cli("convert", llava_checkpoint, "--out", ours, "--quant", "F16", "--name", "ours", root=root).returncode == 0
    adopted = cli("import", theirs, ours / "mmproj-ours-F16.gguf", "--name", "theirs", root=root)
    assert adopted.returncode == 0 and "linked" in adopted.stderr, adopted.stderr
    manifest = json.loads((root / "theirs" / "manifest.json").read_text())
    assert [(f["role"], f["type"]) for f in manifest["files"]] == [("language", "F16"), ("vision", "F16")]
    assert manifest["source"]["imported"][0] == str(theirs) and manifest["source"]["family"] == "llava_llama"
    assert os.path.samefile(root / "theirs" / "theirs-F16.gguf", theirs)  # linked: llama.cpp's very bytes
    answered = cli("chat", noise_image, "-m", "theirs", "-p", QUESTION, "--max-tokens", "8", "--json", root=root)
    usage = json.loads(answered.stdout)["usage"]
    assert answered.returncode == 0 and usage["images_encoded"] == 1 and usage["completion_tokens"] >= 1
    # the same model: given the same tokens and picture, the same next-token distribution as ours
    from acestep_gguf import VisionChat
    from acestep_gguf.runtime.generation import TurnStats
    from test_parity import IMAGE_BOUND, top10_gap
    os.environ["ACESTEP_GGUF_MODELS"] = str(root)
    try:
        with VisionChat.load("theirs", n_gpu_layers=0) as a, VisionChat.load(ours, n_gpu_layers=0) as b:
            picture = b.prepare_image(noise_image)
            ids = b._kv.tokenize_text("USER: "), b._kv.tokenize_text("\nWhat is in this picture? ASSISTANT:")
            got = []
            for chat in (a, b):
                chat._kv.prefill([("tokens", [1] + ids[0]), ("image", picture), ("tokens", ids[1])], TurnStats())
                got.append(chat._kv.last_logprobs())
            assert top10_gap(got[1], got[0]) < IMAGE_BOUND
            # what differs is llama.cpp's converter's vocabulary: its fallback for a tokenizer.json without
            # tokenizer.model scores every piece -1000, so "picture" is three pieces where the checkpoint has one
            theirs_ids, ours_ids = (c._kv.tokenize_text("What is in this picture?") for c in (a, b))
            assert 7623 in ours_ids and 7623 not in theirs_ids and len(theirs_ids) == len(ours_ids) + 2
    finally:
        del os.environ["ACESTEP_GGUF_MODELS"]
    one_error_line(cli("import", theirs, ours / "mmproj-ours-F16.gguf", "--name", "theirs", root=root), "already")
    one_error_line(cli("import", ours / "mmproj-ours-F16.gguf", theirs, "--name", "swapped", root=root), "mmproj")
    assert not (root / "swapped").exists()


# -- one server for the store -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_server(store, tmp_path_factory):
    s = Server(None, models=store, cache_dir=tmp_path_factory.mktemp("states"))
    yield s
    s.stop()


def answer(server, model: str, messages) -> tuple[str, object]:
    reply = server.client().chat.completions.create(model=model, messages=messages, max_tokens=8)
    return reply.choices[0].message.content, reply.usage


def test_the_official_clients_list_every_model(store_server):
    import ollama
    client = ollama.Client(host=f"http://127.0.0.1:{store_server.port}")
    assert sorted(m.model for m in client.list().models) == ["demo-q4:Q4_K_M", "demo-q8:Q8_0", "llava:Q8_0"]
    assert sorted(m.id for m in store_server.client().models.list().data) == ["demo-q4:Q4_K_M", "demo-q8:Q8_0",
                                                                            "llava:Q8_0"]
    shown = client.show("llava")
    assert shown.details.family == "llava_llama" and "ASSISTANT" in shown.template
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="nosuch", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404
    status, raw = store_server.post("/v1/chat/completions", {"model": "nosuch", "messages": [user("hi")]})
    assert status == 404 and json.loads(raw)["error"]["code"] == "model_not_found"


def test_requests_alternate_between_models_with_one_loaded(store_server, store, noise_image):
    """--max-loaded 1 (the default): each switch unloads the previous model (/api/ps shows it), every
    model gives its own answers, and a follow-up after switching back still hits that model's cache
    (its state went to disk when it was unloaded)."""
    expected = {name: cli("chat", noise_image, "-m", name, "-p", QUESTION, "--max-tokens", "8", root=store).stdout.strip()
                for name in ("demo-q8", "llava")}
    assert expected["demo-q8"] != expected["llava"]
    talks = {name: [user(QUESTION, noise_image)] for name in expected}
    for turn in range(2):
        for name in ("demo-q8", "llava"):
            text, usage = answer(store_server, name, talks[name])
            if turn == 0:
                assert text == expected[name]
            else:
                assert usage.prompt_tokens_details.cached_tokens > 16  # from its saved state, not re-encoded
            ps = json.loads(store_server.get("/api/ps")[1])["models"]
            assert [m["name"] for m in ps] == [f"{name}:Q8_0"]
            talks[name] += [{"role": "assistant", "content": text}, {"role": "user", "content": "And the colour?"}]


def test_keep_alive_zero_unloads_at_once(store_server):
    import ollama
    client = ollama.Client(host=f"http://127.0.0.1:{store_server.port}")
    reply = client.generate(model="demo-q4", prompt="What shape is this?", keep_alive=0, options={"num_predict": 4})
    assert reply.response
    assert client.ps().models == []
    client.generate(model="demo-q4:Q4_K_M", prompt="Hi", keep_alive="10m", options={"num_predict": 2})
    (loaded,) = client.ps().models
    assert loaded.model == "demo-q4:Q4_K_M" and loaded.expires_at is not None


def test_pull_and_delete_over_http(tmp_path, llava_checkpoint):
    import ollama
    root = tmp_path / "store"
    s = Server(None, models=root)
    try:
        client = ollama.Client(host=f"http://127.0.0.1:{s.port}")
        assert client.list().models == []
        statuses = [p.status for p in client.pull(str(llava_checkpoint), stream=True)]
        assert statuses[-1] == "success" and any("write language" in (st or "") for st in statuses)
        assert [m.model for m in client.list().models] == ["tiny-llava15:Q4_K_M"]
        assert client.chat(model="tiny-llava15", messages=[{"role": "user", "content": "hi"}],
                           options={"num_predict": 2}).message.content is not None
        client.delete("tiny-llava15")
        assert client.list().models == [] and not (root / "tiny-llava15").exists()
        with pytest.raises(ollama.ResponseError):
            client.pull(str(tmp_path / "nowhere"), stream=False)
    finally:
        s.stop()


def test_pull_by_repo_id_from_the_local_hugging_face_cache(tmp_path, hub_cache):
    root = tmp_path / "store"
    done = cli("pull", "acme/tiny-llava", "--quant", "Q8_0", root=root,
               timeout=300)
    assert done.returncode == 0, done.stderr
    assert [m["name"] for m in json.loads(cli("list", "--json", root=root).stdout)["models"]] == ["tiny-llava"]


def test_the_page_lets_the_user_pick_the_model(store_server, browser):
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{store_server.port}/")
    page.wait_for_function("document.querySelectorAll('#model option').length === 3")
    assert page.locator("#model option").all_inner_texts() == ["demo-q4:Q4_K_M", "demo-q8:Q8_0", "llava:Q8_0"]
    page.select_option("#model", "llava:Q8_0")
    page.fill("#prompt", "Hello?")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".assistant .bubble[data-state=done]")
    assert [m["name"] for m in json.loads(store_server.get("/api/ps")[1])["models"]] == ["llava:Q8_0"]
    page.reload()  # the choice is remembered
    page.wait_for_function("document.querySelectorAll('#model option').length === 3")
    assert page.eval_on_selector("#model", "s => s.value") == "llava:Q8_0"
    page.close()
