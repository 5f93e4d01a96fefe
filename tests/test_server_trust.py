"""`serve` at its trust boundary, tried as a hostile client and a hostile web page would: real requests
against a real server on 127.0.0.1, asserting the status, the body's shape, the server's memory (its
RSS, read from /proc) and that it answers a normal request right after. docs/security.md lists the
promises these check."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_server import QUESTION, Server, user

MIB = 1 << 20


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    s = Server(converted, "--body-timeout", "2", cache_dir=tmp_path_factory.mktemp("states"))
    yield s
    s.stop()


def answers_normally(server, noise_image) -> None:
    reply = server.client().chat.completions.create(model="tiny-llava", messages=[user(QUESTION, noise_image)],
                                                    max_tokens=3)
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens >= 1


def chat_body(**extra) -> dict:
    return {"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


def error_of(raw: bytes, ollama: bool = False):
    body = json.loads(raw)
    return body["error"] if ollama else body["error"]["code"]


# -- grammars -----------------------------------------------------------------------------------------
BOMBS = [
    {"type": "array", "minItems": 100_000_000, "items": {"type": "integer"}},
    {"type": "array", "minItems": 10_000_000, "items": {"type": "integer"}},
    {"type": "string", "maxLength": 50_000_000},
    {"type": "string", "pattern": "^(a{1000}){1000}$"},
    {"type": "string", "pattern": "^(a{200}){200}(b{200}){200}$"},
    {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)}},
    json.loads('{"type": "array", "items": ' * 40 + '{"type": "integer"}' + "}" * 40),  # 40 deep
]


def test_schemas_that_would_cost_gigabytes_are_refused_before_work(server, noise_image):
    before = server.rss()
    for schema in BOMBS:
        status, raw = server.post("/v1/chat/completions", chat_body(
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}))
        assert status == 400 and error_of(raw) == "schema_too_large", raw[:200]
        status, raw = server.post("/api/generate", {"model": "tiny-llava", "prompt": "hi", "stream": False, "format": schema})
        assert status == 400 and "schema" in error_of(raw, ollama=True)
    assert server.rss() - before < 100 * MIB
    # a real schema still works, compiled off the event loop
    status, raw = server.post("/v1/chat/completions", chat_body(max_tokens=30, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "minItems": 2, "maxItems": 3,
                                                                        "items": {"type": "integer"}}}}))
    assert status == 200 and isinstance(json.loads(json.loads(raw)["choices"][0]["message"]["content"]), list)
    answers_normally(server, noise_image)


# -- pictures -----------------------------------------------------------------------------------------
def grey16(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint16)).save(buf, "PNG")  # 170 KiB for 8192 x 8192
    return buf.getvalue()


def test_small_files_that_decode_to_gigabytes_are_refused_from_their_header(server, noise_image):
    png = grey16(8192)
    assert len(png) < 1 * MIB
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    body = {"model": "tiny-llava", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri}} for _ in range(4)] + [{"type": "text", "text": "hi"}]}]}
    before, results = server.rss(), []

    def send():
        results.append(server.post("/v1/chat/completions", body))
    threads = [threading.Thread(target=send) for _ in range(4)]  # four requests of four such pictures at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [status for status, _ in results] == [400] * 4
    assert all("MiB limit for one picture" in json.loads(raw)["error"]["message"] for _, raw in results)
    assert server.rss() - before < 100 * MIB
    status, raw = server.post("/api/chat", {"model": "tiny-llava", "stream": False, "messages": [
        {"role": "user", "content": "hi", "images": [base64.b64encode(png).decode()]}]})
    assert status == 400 and "MiB limit" in error_of(raw, ollama=True)
    answers_normally(server, noise_image)


# -- browsers -----------------------------------------------------------------------------------------
def test_requests_a_web_page_could_send_are_refused(server):
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {"Content-Type": ""}
        status, raw = server.request("POST", "/api/generate", json.dumps({"model": "tiny-llava", "prompt": "hi",
                                                                         "stream": False}).encode(), headers=headers)
        assert status == 415 and "application/json" in json.loads(raw)["error"]
    for origin in ("http://evil.example", "null", f"http://localhost:{server.port + 1}", "https://127.0.0.1"):
        status, raw = server.post("/v1/chat/completions", chat_body(), headers={"Origin": origin})
        assert status == 403 and error_of(raw) == "origin_not_allowed", origin
    status, _ = server.post("/v1/chat/completions", chat_body(), headers={"Origin": f"http://127.0.0.1:{server.port}"})
    assert status == 200  # the server's own page


def test_a_page_on_another_origin_cannot_make_it_generate(server, tmp_path):
    """Headless Chromium on a page from another local port: the simple cross-site requests a page can make
    (no-cors text/plain, a form post, a JSON fetch that needs a preflight) all fail, and no turn runs."""
    import http.server
    import shutil
    from test_server_page import CHROMIUM, FLAGS
    if not shutil.which("chromium"):
        pytest.fail("chromium is missing: run tools/install_test_deps.sh")
    from playwright.sync_api import sync_playwright
    target = f"http://127.0.0.1:{server.port}"
    (tmp_path / "index.html").write_text(f"""<!doctype html><form id=f method=post action="{target}/api/generate"
      enctype="text/plain"><input name='{{"model":"tiny-llava","prompt":"hi","stream":false,"x":"' value='"}}'></form>
      <script>
      const body = JSON.stringify({{model: "tiny-llava", prompt: "hi", stream: false}});
      window.results = [];
      fetch("{target}/api/generate", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body}})
        .then(() => results.push("no-cors sent"), e => results.push("no-cors failed"));
      fetch("{target}/api/generate", {{method: "POST", headers: {{"Content-Type": "application/json"}}, body}})
        .then(r => results.push("json " + r.status), e => results.push("json blocked"));
      </script>""")
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: http.server.SimpleHTTPRequestHandler(
        *a, directory=str(tmp_path)))
    threading.Thread(target=site.serve_forever, daemon=True).start()
    served = server.stats()["requests"]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{site.server_address[1]}/index.html")
            page.wait_for_function("window.results.length === 2", timeout=20000)
            outcome = sorted(page.evaluate("window.results"))
            page.evaluate("document.getElementById('f').submit()")
            page.wait_for_load_state()
            browser.close()
    finally:
        site.shutdown()
    assert outcome == ["json blocked", "no-cors sent"]  # the request left the page, but was refused
    assert server.stats()["requests"] == served  # nothing was generated


@pytest.mark.parametrize("host,status", [
    ("127.0.0.1.attacker.example", 403), ("127.evil.example", 403), ("localhost.attacker.example", 403),
    ("attacker.example", 403), ("LOCALHOST", 200), ("localhost.", 200), ("127.9.9.9", 200), ("[::1]", 200),
    ("Localhost:80", 200)])
def test_host_names_are_compared_whole(server, host, status):
    got, raw = server.request("GET", "/v1/models", headers={"Host": host})
    assert got == status, raw[:200]


def test_allowed_host(converted):
    s = Server(converted, "--allowed-host", "studio.lan")
    try:
        assert s.request("GET", "/v1/models", headers={"Host": "studio.lan:8080"})[0] == 200
        assert s.request("GET", "/v1/models", headers={"Host": "other.lan"})[0] == 403
    finally:
        s.stop()


# -- connections --------------------------------------------------------------------------------------
def test_idle_and_slow_connections_cannot_exhaust_it(server, noise_image):
    idle = []
    try:
        for _ in range(200):  # past the 128-connection cap
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        time.sleep(0.5)
        reply = idle[-1].recv(4096)  # answered as soon as it connected
        assert reply.startswith(b"HTTP/1.1 503") and b"too_many_connections" in reply
    finally:
        for s in idle:
            s.close()
    time.sleep(0.5)
    answers_normally(server, noise_image)
    slow = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    slow.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")  # headers never finish
    started = time.monotonic()
    assert slow.recv(4096) == b""  # closed by the server's 10 s head deadline
    assert time.monotonic() - started < 25
    slow.close()


def test_a_slow_body_times_out_and_aborted_uploads_log_no_tracebacks(converted, noise_image):
    s = Server(converted, "--body-timeout", "1")
    try:
        conn = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        conn.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\":")
        reply = b""
        while b"did not arrive" not in reply and (chunk := conn.recv(4096)):  # head and body may come apart
            reply += chunk
        assert b" 408 " in reply.split(b"\r\n")[0] and b"did not arrive" in reply
        conn.close()
        for _ in range(30):  # uploads cut off half-way
            c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000000\r\n\r\n" + b"x" * 5000)
            c.close()
        for _ in range(200):  # a flood of malformed requests: each is logged by uvicorn, but not 200 times
            c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            c.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
            c.recv(1024)
            c.close()
        time.sleep(1)
        answers_normally(s, noise_image)
    finally:
        log = s.stop()
    assert "Traceback" not in log, log[-2000:]
    assert 1 <= log.count("Invalid HTTP request") <= 10  # rate-limited: 5 per 10 s, then counted


# -- text -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", '{"model":"tiny-llava","messages":[{"role":"user","content":"hi \\ud800"}]}'),
    ("/v1/chat/completions", '{"model":"tiny-llava","stream":true,"messages":[{"role":"user","content":[{"type":"text","text":"\\udfff"}]}]}'),
    ("/v1/chat/completions", '{"model":"tiny-llava","stop":["\\ud83d"],"messages":[{"role":"user","content":"hi"}]}'),
    ("/api/chat", '{"model":"tiny-llava","messages":[{"role":"user","content":"cut \\ud83d"}]}'),
    ("/api/generate", '{"model":"tiny-llava","prompt":"ok","system":"\\ud800"}'),
])
def test_lone_surrogates_are_a_400_not_a_500(server, noise_image, path, body):
    status, raw = server.post(path, body.encode())
    assert status == 400 and "not valid Unicode" in raw.decode()
    answers_normally(server, noise_image)


@pytest.mark.parametrize("path,body,needle", [
    ("/api/generate", {"model": "tiny-llava", "prompt": "hi", "stream": False, "options": {"stop": ["x"] * 200_000}},
     "up to 16"),
    ("/v1/chat/completions", chat_body(stop=["y" * 5000]), "up to 16"),
    ("/v1/chat/completions", {"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}] * 600}, "messages"),
    ("/v1/chat/completions", {"model": "tiny-llava", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}] * 100}]}, "parts"),
    ("/api/generate", {"model": "tiny-llava", "prompt": "z" * (5 << 20)}, "characters of text"),
])
def test_stops_messages_parts_and_text_are_bounded_in_both_apis(server, path, body, needle):
    status, raw = server.post(path, body)
    assert status in (400, 413) and needle in raw.decode()


# -- the cache folder --------------------------------------------------------------------------------
def state_folder(cache: Path) -> Path:
    folders = [p for p in cache.iterdir() if p.is_dir()]
    assert len(folders) == 1
    return folders[0]


def rewrite_state(path: Path, edit_doc=None, edit_kv=None) -> None:
    """Change a saved state's plain data and give it a valid checksum again (what a hostile file can do)."""
    data = path.read_bytes()
    n = struct.unpack("<I", data[12:16])[0]
    header, payload = json.loads(data[16:16 + n]), data[16 + n:]
    (k,) = struct.unpack_from("<Q", payload)
    doc, blobs = json.loads(payload[8:8 + k]), bytearray(payload[8 + k:])
    if edit_doc:
        edit_doc(doc)
    if edit_kv:
        start, length = doc["kv"]
        blobs[start:start + length] = edit_kv(bytes(blobs[start:start + length]))
    new_doc = json.dumps(doc).encode()
    payload = struct.pack("<Q", len(new_doc)) + new_doc + bytes(blobs)
    header.update(bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    head = json.dumps(header).encode()
    path.write_bytes(b"ACESTEP-KV1\n" + struct.pack("<I", len(head)) + head + payload)


def one_saved_state(cache: Path, converted, noise_image) -> Path:
    """Serve one conversation and stop: the cache folder then holds exactly its state."""
    first = Server(converted, cache_dir=cache)
    try:
        answers_normally(first, noise_image)
    finally:
        first.stop()
    (saved,) = list(state_folder(cache).glob("*.kv"))
    return saved


def test_a_state_llama_cpp_refuses_is_dropped(tmp_path, converted, noise_image):
    cache = tmp_path / "states"
    saved = one_saved_state(cache, converted, noise_image)
    rewrite_state(saved, edit_kv=lambda kv: b"\xff\xff\xff\x7f" + kv[4:])  # an impossible cell count
    second = Server(converted, cache_dir=cache)
    try:
        answers_normally(second, noise_image)
        answers_normally(second, noise_image)
    finally:
        log = second.stop()
    assert "refused a saved conversation state; dropped it" in log and "Traceback" not in log
    third = Server(converted, cache_dir=cache)  # the state kept at that shutdown is a good one
    try:
        reply = third.client().chat.completions.create(model="tiny-llava", messages=[user(QUESTION, noise_image)],
                                                       max_tokens=3)
        assert reply.usage.prompt_tokens_details.cached_tokens > 16 and third.stats()["state_cache"]["dropped"] == 0
    finally:
        third.stop()


def test_nothing_in_the_cache_folder_can_stop_it(tmp_path, converted, noise_image):
    cache = tmp_path / "states"
    saved = one_saved_state(cache, converted, noise_image)
    folder = saved.parent
    os.mkfifo(folder / "fifo.kv")
    (folder / "dir.kv").mkdir()
    (folder / "link.kv").symlink_to("/etc/hostname")
    # a checksum-valid state that claims 100000 positions (the context holds 4096)
    def claim(doc):
        doc["n_past"] = 100000
        doc["spans"][-1][1] = 100000 - sum(span[1] for span in doc["spans"][:-1])
    rewrite_state(saved, claim)
    second = Server(converted, cache_dir=cache)  # starts: the FIFO is not waited on, the directory not opened
    try:
        for _ in range(2):  # the bad state is dropped, not retried; image requests keep working
            reply = second.client().chat.completions.create(model="tiny-llava", messages=[user(QUESTION, noise_image)],
                                                            max_tokens=3)
            assert reply.usage.completion_tokens >= 1
        assert second.stats()["state_cache"]["dropped"] == 1
    finally:
        log = second.stop()
    assert "Traceback" not in log and "fifo.kv" in log  # skipped, and said so
    assert (folder / "fifo.kv").exists() and (folder / "dir.kv").is_dir()  # skipped, not deleted


def test_a_bad_cache_dir_is_one_line(tmp_path, converted):
    from hostile import cli_process
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for bad, why in (("/etc/hostname", "not a folder"), ("/proc/version/x", "cannot be created"), (fifo, "not a folder"),
                     (tmp_path / "dangling", "dangling symlink")):
        done = cli_process("serve", "-m", converted, "--port", "1", "--cache-dir", bad)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith(f"error: --cache-dir {bad}: ") and why in done.stderr


def test_servers_of_other_contexts_keep_their_own_states(tmp_path, converted, noise_image):
    cache = tmp_path / "shared"
    for ctx in ("4096", "2048", "4096"):  # the last option given wins over the helper's --ctx 4096
        s = Server(converted, "--ctx", ctx, cache_dir=cache)
        try:
            answers_normally(s, noise_image)
        finally:
            s.stop()
    folders = sorted(p for p in cache.iterdir() if p.is_dir())
    assert len(folders) == 2 and all(list(f.glob("*.kv")) for f in folders)


def test_two_clients_taking_turns_store_each_conversation_once(converted, noise_image, second_image):
    """Each switch saves the conversation left; a state whose conversation is a prefix of another is
    not kept beside it, so the store grows with conversations, not with turns (one slot: with more,
    each conversation would keep a slot of its own and the store would not be needed)."""
    s = Server(converted, "--parallel", "1")
    cached = []
    try:
        client = s.client()
        talks = [[user(QUESTION, noise_image)], [user("Describe it.", second_image)]]
        for turn in range(4):
            for messages in talks:
                reply = client.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=3)
                cached.append(reply.usage.prompt_tokens_details.cached_tokens)
                messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                             {"role": "user", "content": f"And then {turn}?"}]
        entries = s.stats()["state_cache"]["entries"]
    finally:
        s.stop()
    assert min(cached[2:]) > 16  # after their first turns, each conversation kept its cache
    # one per conversation (the current one's older turn waits there until it is left again); without
    # dropping prefixes it would be one per switch: 7
    assert entries == 2


# -- Ollama, shutdown -----------------------------------------------------------------------------------
def test_ollama_ps_with_the_official_client(server):
    import ollama
    listed = ollama.Client(host=f"http://127.0.0.1:{server.port}").ps()
    (model,) = listed.models
    assert model.model == "tiny-llava:latest" and model.size > 0 and model.expires_at is not None


@pytest.mark.parametrize("api,sig", [("openai", "SIGTERM"), ("ollama", "SIGINT")])
def test_a_stop_signal_ends_streams_properly_saves_and_exits_0(endless, tmp_path, noise_image, api, sig):
    import http.client
    import signal
    cache = tmp_path / "states"
    s = Server(endless, cache_dir=cache, quant="F16")
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    if api == "openai":
        body = {"model": "endless", "stream": True, "max_tokens": 100000, "messages": [user(QUESTION, noise_image)]}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    else:
        body = {"model": "endless", "stream": True, "options": {"num_predict": 100000},
                "messages": [{"role": "user", "content": QUESTION}]}
        conn.request("POST", "/api/chat", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    pieces = 0
    while pieces < 3:  # the reply is being generated (not just the role chunk)
        line = response.readline().decode()
        pieces += '"content": "' in line and '"content": ""' not in line
    s.proc.send_signal(getattr(signal, sig))
    rest = response.read().decode()
    s.proc.communicate(timeout=60)
    assert s.proc.returncode == 0
    if api == "openai":
        events = [ln[6:] for ln in rest.splitlines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "stop"
    else:
        last = json.loads(rest.strip().splitlines()[-1])
        assert last["done"] is True and last["done_reason"] == "stop"
    assert list(cache.glob("*/*.kv"))  # the conversation was kept for the next start


def test_context_errors_speak_of_the_servers_ctx(server):
    status, raw = server.post("/v1/chat/completions", {"model": "tiny-llava", "messages": [
        {"role": "user", "content": "word " * 5000}]})
    assert status == 400 and "--ctx 4096" in json.loads(raw)["error"]["message"] and "reset()" not in raw.decode()


def test_large_pictures_that_are_accepted_are_freed_afterwards(server, noise_image):
    """A 20-megapixel photo (80 MiB of decoded pixels, within the limit) five times in a row: the server's
    memory does not grow by a picture per request."""
    gradient = np.linspace(0, 255, 5000, dtype=np.float32)[None, :, None] * np.ones((4000, 1, 3), np.float32)
    buf = io.BytesIO()
    Image.fromarray(gradient.astype(np.uint8)).save(buf, "JPEG", quality=80)
    body = {"model": "tiny-llava", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()}},
        {"type": "text", "text": "hi"}]}]}
    assert server.post("/v1/chat/completions", body)[0] == 200
    after_one = server.rss()
    for _ in range(4):
        assert server.post("/v1/chat/completions", body)[0] == 200
    assert server.rss() - after_one < 100 * MIB
    answers_normally(server, noise_image)
