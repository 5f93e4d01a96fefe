"""`acestep-gguf serve` as apps use it: a real server process on 127.0.0.1 (a free port), stopped by
its PID, driven by the official `openai` client and by plain HTTP for Ollama's API. Cache behaviour
is checked through `usage` and /stats, never by timing."""

from __future__ import annotations

import base64
import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostile import cli_process

QUESTION = "What is in this picture?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder: Path | None, *args: str, cache_dir: Path | None = None, quant: str = "Q8_0",
                 models: Path | None = None):
        """One model (``folder``), or every model of the store folder ``models``."""
        self.port = free_port()
        which = ["--models", str(models)] if models is not None else ["-m", str(folder), "--quant", quant]
        self.args = ["serve", *which, "--port", str(self.port), "--ctx", "4096",
                     "--cache-dir", str(cache_dir) if cache_dir else "none", *args]
        self.proc = subprocess.Popen([sys.executable, "-m", "acestep_gguf", *self.args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def request(self, method: str, path: str, body=None, headers=None, timeout=60):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        raw = response.read()
        conn.close()
        return response.status, raw

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body, **kw):
        status, raw = self.request("POST", path, body, **kw)
        return status, raw

    def stats(self) -> dict:
        return json.loads(self.get("/stats")[1])

    def client(self, key: str = "none"):
        from openai import OpenAI
        return OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, timeout=60, max_retries=0)

    def stop(self, sig=signal.SIGTERM) -> str:
        self.proc.send_signal(sig)  # by its PID
        out, _ = self.proc.communicate(timeout=60)
        return out

    def rss(self) -> int:
        """The server process's resident memory, in bytes (/proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def server(converted):
    s = Server(converted, "--parallel", "1")  # one slot: conversations taking turns go through the state store
    yield s
    s.stop()


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def user(text: str, *images: Path) -> dict:
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": data_uri(p)}} for p in images),
                                        {"type": "text", "text": text}]}


def test_openai_answers_equal_the_chat_command(server, converted, noise_image):
    expected = cli_process("chat", noise_image, "-m", converted, "-p", QUESTION, "--max-tokens", "8", "--quant", "Q8_0")
    assert expected.returncode == 0
    client = server.client()
    reply = client.chat.completions.create(model="tiny-llava", messages=[user(QUESTION, noise_image)], max_tokens=8,
                                           temperature=0)
    assert reply.choices[0].message.content == expected.stdout.rstrip("\n")
    assert reply.usage.prompt_tokens > 16 and reply.choices[0].finish_reason in ("stop", "length")
    pieces, usage = [], None
    for chunk in client.chat.completions.create(model="tiny-llava", messages=[user(QUESTION, noise_image)], max_tokens=8,
                                                temperature=0, stream=True, stream_options={"include_usage": True}):
        pieces += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(pieces) == expected.stdout.rstrip("\n")
    assert usage.completion_tokens == reply.usage.completion_tokens
    assert [m.id for m in client.models.list()] == ["tiny-llava"]


def test_a_follow_up_costs_only_its_new_tokens(server, noise_image):
    client = server.client()
    first = client.chat.completions.create(model="tiny-llava", messages=[user("Describe this image.", noise_image)],
                                           max_tokens=6)
    encoded = server.stats()["images_encoded"]
    history = [user("Describe this image.", noise_image),
               {"role": "assistant", "content": first.choices[0].message.content}, user("And the colours?")]
    follow = client.chat.completions.create(model="tiny-llava", messages=history, max_tokens=6)
    cached = follow.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens  # earlier turn and reply reused
    assert follow.usage.model_extra["acestep"]["images_encoded"] == 0 and server.stats()["images_encoded"] == encoded


def test_two_conversations_taking_turns_both_keep_their_cache(server, noise_image, second_image):
    client = server.client()
    a1 = client.chat.completions.create(model="tiny-llava", messages=[user("Describe A.", noise_image)], max_tokens=5)
    b1 = client.chat.completions.create(model="tiny-llava", messages=[user("Describe B.", second_image)], max_tokens=5)
    encoded = server.stats()["images_encoded"]
    for first, image, name in ((a1, noise_image, "A"), (b1, second_image, "B"), (a1, noise_image, "A")):
        history = [user(f"Describe {name}.", image), {"role": "assistant", "content": first.choices[0].message.content},
                   user("More?")]
        again = client.chat.completions.create(model="tiny-llava", messages=history, max_tokens=5)
        assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens, name
    assert server.stats()["images_encoded"] == encoded  # no image encoded twice
    assert server.stats()["state_cache"]["hits"] >= 2


def test_a_restarted_server_answers_from_its_disk_cache(tmp_path, converted, noise_image):
    cache = tmp_path / "states"
    first = Server(converted, cache_dir=cache)
    try:
        reply = first.client().chat.completions.create(model="tiny-llava", messages=[user(QUESTION, noise_image)],
                                                       max_tokens=6)
    finally:
        first.stop()
    assert list(cache.glob("*/*.kv"))  # in the subfolder of this model and context
    second = Server(converted, cache_dir=cache)
    try:
        again = second.client().chat.completions.create(model="tiny-llava", messages=[user(QUESTION, noise_image)],
                                                        max_tokens=6)
        assert again.choices[0].message.content == reply.choices[0].message.content
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
        assert second.stats()["images_encoded"] == 0
    finally:
        second.stop()
    (next(cache.glob("*/*.kv"))).write_bytes(b"ACESTEP-KV1\n garbage")  # a damaged file is ignored, not trusted
    third = Server(converted, cache_dir=cache)
    try:
        fresh = third.client().chat.completions.create(model="tiny-llava", messages=[user(QUESTION, noise_image)],
                                                       max_tokens=6)
        assert fresh.choices[0].message.content == reply.choices[0].message.content
        assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        third.stop()


SCHEMA = {"type": "object", "properties": {"shape": {"type": "string", "enum": ["circle", "square", "triangle"]},
                                           "filled": {"type": "boolean"}},
          "required": ["shape", "filled"], "additionalProperties": False}


def test_json_schema_output_validates(server, noise_image):
    reply = server.client().chat.completions.create(
        model="tiny-llava", messages=[user("Answer in JSON.", noise_image)], max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA}})
    data = json.loads(reply.choices[0].message.content)
    assert set(data) == {"shape", "filled"} and data["shape"] in ("circle", "square", "triangle")
    assert isinstance(data["filled"], bool)
    plain = server.client().chat.completions.create(model="tiny-llava", messages=[user("JSON please.")], max_tokens=8,
                                                    response_format={"type": "json_object"})
    # llama.cpp's JSON grammar is applied (a random model's free string may not close within 8 tokens)
    assert plain.choices[0].message.content.lstrip()[:1] in ("{", "[")


def test_ollama_api(server, converted, noise_image):
    expected = cli_process("chat", noise_image, "-m", converted, "-p", QUESTION, "--max-tokens", "8", "--quant", "Q8_0")
    image = base64.b64encode(noise_image.read_bytes()).decode()
    body = {"model": "tiny-llava", "messages": [{"role": "user", "content": QUESTION, "images": [image]}],
            "options": {"num_predict": 8, "temperature": 0}}
    status, raw = server.post("/api/chat", {**body, "stream": False})
    assert status == 200 and json.loads(raw)["message"]["content"] == expected.stdout.rstrip("\n")
    status, raw = server.post("/api/chat", body)  # streams NDJSON by default
    lines = [json.loads(line) for line in raw.decode().splitlines()]
    assert status == 200 and lines[-1]["done"] is True and all(not x["done"] for x in lines[:-1])
    assert "".join(x["message"]["content"] for x in lines) == expected.stdout.rstrip("\n")
    assert lines[-1]["acestep"]["cached_tokens"] > 0  # the same conversation again: from the cache
    status, raw = server.post("/api/generate", {"model": "tiny-llava:latest", "prompt": QUESTION, "images": [image],
                                                "stream": False, "options": {"num_predict": 8}})
    assert status == 200 and json.loads(raw)["response"] == expected.stdout.rstrip("\n")
    status, raw = server.post("/api/chat", {**body, "stream": False, "format": SCHEMA,
                                            "options": {"num_predict": 60}})
    assert set(json.loads(json.loads(raw)["message"]["content"])) == {"shape", "filled"}
    assert json.loads(server.get("/api/tags")[1])["models"][0]["name"] == "tiny-llava:latest"
    status, raw = server.post("/api/show", {"model": "tiny-llava"})
    assert status == 200 and "<|im_start|>" in json.loads(raw)["template"]
    assert "version" in json.loads(server.get("/api/version")[1])


@pytest.mark.parametrize("make,status,code", [
    (lambda: ({"model": "tiny-llava", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}]}, {}), 400, "invalid_image_url"),
    (lambda: ({"model": "tiny-llava", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}, {}), 400, "invalid_image_url"),
    (lambda: ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, {}), 404, "model_not_found"),
    (lambda: (b"{not json", {}), 400, "invalid_json"),
    (lambda: ({"model": "tiny-llava", "messages": "hi"}, {}), 400, "invalid_value"),
    (lambda: ({"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], "temperature": 7}, {}), 400,
     "invalid_value"),
    (lambda: ({"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}]}, {"Host": "attacker.example"}),
     403, "host_not_allowed"),
    (lambda: (b"{" + b" " * (49 << 20) + b"}", {}), 413, "request_too_large"),
    (lambda: ({"model": "tiny-llava", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, {}), 400, "invalid_image"),
])
def test_refusals_have_their_status_and_shape(server, make, status, code):
    body, headers = make()
    got, raw = server.post("/v1/chat/completions", body, headers=headers)
    error = json.loads(raw)["error"]
    assert got == status and error["code"] == code and error["message"] and "type" in error
    assert server.get("/health")[0] == 200  # the server goes on


def test_api_key_and_binding(converted, noise_image):
    keyed = Server(converted, "--api-key", "s3cret")
    try:
        assert keyed.get("/health")[0] == 200  # health needs no key
        status, raw = keyed.post("/v1/chat/completions", {"model": "tiny-llava", "messages": [user("hi")]})
        assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
        status, raw = keyed.post("/api/chat", {"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}]},
                                 headers={"Authorization": "Bearer wrong"})
        assert status == 401 and "API key" in json.loads(raw)["error"]
        ok = keyed.client("s3cret").chat.completions.create(model="tiny-llava", messages=[user("hi")], max_tokens=2)
        assert ok.usage.completion_tokens >= 1
        assert keyed.get("/v1/models")[0] == 401 and keyed.get("/stats")[0] == 401
    finally:
        keyed.stop()
    refused = cli_process("serve", "-m", converted, "--host", "0.0.0.0", "--port", str(free_port()),
                          env={"ACESTEP_GGUF_API_KEY": ""})
    assert refused.returncode == 1 and "needs --api-key" in refused.stderr


def test_a_client_that_disconnects_mid_stream_frees_the_server(endless, noise_image):
    s = Server(endless, quant="F16")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        body = {"model": "endless", "stream": True, "max_tokens": 100000,
                "messages": [user("Tell me everything.", noise_image)]}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        seen = b""
        while seen.count(b"data:") < 5:
            seen += response.read1(4096)
        conn.close()  # the app goes away mid-answer
        after = s.client().chat.completions.create(model="endless", messages=[user("Short?")], max_tokens=3)
        assert after.usage.completion_tokens == 3  # served at once: the abandoned generation was cancelled
        assert s.stats()["requests"] == 2
    finally:
        s.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_gives_up_while_waiting_never_cancels_the_one_being_served(endless, stream):
    s = Server(endless, "--ctx", "16384", "--parallel", "1", quant="F16")  # one slot: the second request waits
    try:
        served = http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
        body = {"model": "endless", "stream": True, "max_tokens": 12000, "messages": [user("Tell me everything.")]}
        served.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = served.getresponse()
        seen = b""
        while seen.count(b"data:") < 5:
            seen += response.read1(4096)
        waiting = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        waiting.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                        body=json.dumps({"model": "endless", "messages": [user("Me too?")], "max_tokens": 3,
                                         "stream": stream}))
        deadline = time.time() + 30
        while s.stats()["waiting"] != 1 and time.time() < deadline:
            time.sleep(0.05)
        assert s.stats()["waiting"] == 1
        waiting.close()  # this app gives up before its turn comes
        seen += response.read()
        events = [json.loads(line[6:]) for line in seen.decode().splitlines() if line.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length"  # not cancelled by the other client
        assert sum(1 for e in events if e["choices"][0]["delta"].get("content")) > 0
        deadline = time.time() + 30
        while s.stats()["dropped"] != 1 and time.time() < deadline:
            time.sleep(0.05)
        assert s.stats() | {"images_encoded": None, "state_cache": None, "models": None} == {
            "requests": 1, "waiting": 0, "dropped": 1, "images_encoded": None, "state_cache": None, "models": None,
            "slots": 1, "slots_busy": 0, "decode_steps": s.stats()["decode_steps"], "decoded_tokens": s.stats()["decode_steps"]}
    finally:
        s.stop()
