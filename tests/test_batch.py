"""Several conversations decoded together (runtime/batch.py): the Python batch API, caption --parallel
and serve --parallel give the answers of one at a time, with every sequence on its own. Whether
sequences really decoded together is read from counters (BatchCounters, /stats), never from clocks."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from test_server import Server, user

from acestep_gguf import BatchRequest, VisionChat, convert
from acestep_gguf.demo import DEMO_CHECKPOINT, demo_question


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo-gguf"
    convert(DEMO_CHECKPOINT, out=out, quant="Q8_0,Q4_K_M", name="acestep-demo")
    return out


@pytest.fixture(scope="module")
def questions():
    """Pictures of the training generator's full range, each asked a question or a description."""
    rng = random.Random(21)
    out = []
    for i in range(12):
        picture, question, _ = demo_question(rng, hard=True)
        out.append((question if i % 3 else "Describe this image.", picture))
    return out


def one_at_a_time(chat, questions, **sampling) -> list[str]:
    answers = []
    for question, picture in questions:
        chat.reset()
        answers.append(chat.ask(question, [picture], **sampling))
    return answers


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_batch_of_four_answers_as_one_at_a_time(demo, questions, quant):
    with VisionChat.load(demo, quant=quant, n_ctx=1024) as chat:
        alone = one_at_a_time(chat, questions, max_tokens=40)
    with VisionChat.load(demo, quant=quant, n_ctx=1024, parallel=4) as chat:
        assert chat.parallel == 4
        replies = list(chat.batch([BatchRequest(q, (p,)) for q, p in questions], max_tokens=40))
        counters = chat.last_batch
        after = chat.ask(*questions[0][:1], [questions[0][1]], max_tokens=40)  # the chat goes on as usual
    assert [r.index for r in replies] == list(range(len(questions)))
    assert [r.error for r in replies] == [None] * len(questions)
    assert [r.text for r in replies] == alone
    assert after == alone[0]
    assert counters.widest == 4 and counters.mean_width > 2  # several sequences per llama_decode


def test_a_bad_picture_and_a_full_context_leave_the_others_alone(demo, questions, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    long_question = "tell me " * 400  # more than the 1024 positions one sequence holds
    requests = [(questions[0][0], [questions[0][1]]), ("What is it?", [broken]), (long_question, [questions[1][1]]),
                (questions[2][0], [questions[2][1]]), (questions[3][0], [questions[3][1]])]
    with VisionChat.load(demo, quant="Q8_0", n_ctx=1024) as chat:
        alone = one_at_a_time(chat, [questions[i] for i in (0, 2, 3)], max_tokens=40)
    with VisionChat.load(demo, quant="Q8_0", n_ctx=1024, parallel=4) as chat:
        replies = list(chat.batch(requests, max_tokens=40))
    assert [r.text for r in replies if r.error is None] == alone
    assert "broken.png" in replies[1].error and replies[1].text == ""
    assert "positions but the context holds" in replies[2].error


def test_cancel_ends_every_sequence_and_unstarted_requests_get_no_reply(demo, questions):
    with VisionChat.load(demo, quant="Q8_0", n_ctx=1024, parallel=2) as chat:
        replies = chat.batch([BatchRequest(q, (p,)) for q, p in questions], max_tokens=40)
        first = next(replies)
        chat.cancel()
        rest = list(replies)
        assert chat.ask("What colour is it?", [questions[0][1]], max_tokens=5)  # the session is free again
    assert first.index == 0 and first.stats.finish_reason in ("stop", "length")
    assert len(rest) <= 2 and all(r.stats.finish_reason == "cancelled" for r in rest if r.index > 1)


def write_pictures(folder, questions):
    folder.mkdir()
    for i, (_, picture) in enumerate(questions):
        picture.save(folder / f"p{i:02d}.png")
    (folder / "p99-broken.jpg").write_bytes(b"not a picture")
    return folder


def caption(folder, demo, out, *extra):
    done = subprocess.run([sys.executable, "-m", "acestep_gguf", "caption", str(folder), "-m", str(demo), "--out",
                           str(out), "--max-tokens", "40", "--ctx", "1024", "--json", *extra], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_caption_parallel_4_writes_the_file_of_parallel_1(demo, questions, tmp_path):
    folder = write_pictures(tmp_path / "pics", questions)
    one, four = tmp_path / "one.jsonl", tmp_path / "four.jsonl"
    assert caption(folder, demo, one, "--parallel", "1")["captioned"] == 12
    summary = caption(folder, demo, four, "--parallel", "4")
    assert (summary["captioned"], summary["failed"]) == (12, 1)
    assert four.read_bytes() == one.read_bytes()  # same answers, same order (input order), same error line
    assert [json.loads(line)["image"] for line in one.read_text().splitlines()] == \
        [str(p) for p in sorted(folder.iterdir())]


def rotated_pictures(folder, n: int, degrees: int, noise_image, second_image) -> list:
    """``n`` distinct pictures (the two fixtures, turned by ``degrees`` more each time) in ``folder``."""
    from PIL import Image
    folder.mkdir(exist_ok=True)
    paths = [folder / f"p{i:02d}.png" for i in range(n)]
    for i, path in enumerate(paths):
        Image.open(noise_image if i % 2 else second_image).rotate(degrees * i).save(path)
    return paths


def parallel_caption(folder, model, out, max_tokens: int) -> list[str]:
    return [sys.executable, "-m", "acestep_gguf", "caption", str(folder), "-m", str(model), "--out", str(out),
            "--max-tokens", str(max_tokens), "--parallel", "4"]


def wait_for_lines(out, n: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < n):
        time.sleep(0.02)


def test_a_killed_parallel_caption_run_resumes_exactly_once(endless, tmp_path, noise_image, second_image):
    folder = tmp_path / "pics"
    rotated_pictures(folder, 24, 15, noise_image, second_image)
    out = tmp_path / "out.jsonl"
    cmd = parallel_caption(folder, endless, out, 60)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_lines(out, 5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    partial = len(out.read_bytes().splitlines())
    assert 5 <= partial < 24
    done = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["skipped"] == partial
    images = [json.loads(line)["image"] for line in out.read_text().splitlines()]
    assert sorted(images) == [str(p) for p in sorted(folder.iterdir())]  # each picture exactly once


def chat_body(question, picture, max_tokens, stream=False):
    return {"model": "endless", "messages": [user(question, picture)], "max_tokens": max_tokens, "stream": stream}


def test_four_concurrent_clients_get_the_sequential_answers_and_their_own_cache(endless, noise_image, second_image,
                                                                               tmp_path):
    pictures = rotated_pictures(tmp_path / "pics", 4, 40, noise_image, second_image)
    questions = [f"Question {i}?" for i in range(4)]
    one = Server(endless, "--parallel", "1", quant="F16")
    try:
        sequential = [one.client().chat.completions.create(model="endless", messages=[user(q, p)], max_tokens=120)
                      .choices[0].message.content for q, p in zip(questions, pictures)]
    finally:
        one.stop()
    four = Server(endless, "--parallel", "4", quant="F16")
    try:
        assert four.stats()["slots"] == 4
        barrier, answers, follow_ups = threading.Barrier(4), [None] * 4, [None] * 4

        def client(i):
            c = four.client()
            barrier.wait()
            first = c.chat.completions.create(model="endless", messages=[user(questions[i], pictures[i])], max_tokens=120)
            answers[i] = first
            history = [user(questions[i], pictures[i]), {"role": "assistant", "content": first.choices[0].message.content},
                       user("And then?")]
            follow_ups[i] = c.chat.completions.create(model="endless", messages=history, max_tokens=5)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = four.stats()
    finally:
        four.stop()
    assert [a.choices[0].message.content for a in answers] == sequential
    for first, again in zip(answers, follow_ups):  # each conversation's slot kept it: nothing re-read
        assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert stats["requests"] == 8 and stats["images_encoded"] == 4 and stats["state_cache"]["hits"] == 0
    assert stats["decoded_tokens"] > 1.5 * stats["decode_steps"]  # the four were decoded together


def test_a_client_leaving_mid_stream_stops_only_its_own_slot(endless, noise_image, second_image):
    import http.client
    one = Server(endless, "--parallel", "1", quant="F16")
    try:
        alone = one.client().chat.completions.create(model="endless", messages=[user("Stay?", second_image)], max_tokens=200)
    finally:
        one.stop()
    s = Server(endless, "--parallel", "3", "--ctx", "8192", quant="F16")
    try:
        leaving = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        leaving.request("POST", "/v1/chat/completions", body=json.dumps(chat_body("Go?", noise_image, 100000, True)),
                        headers={"Content-Type": "application/json"})
        response = leaving.getresponse()
        seen = b""
        while seen.count(b"data:") < 5:
            seen += response.read1(4096)
        staying: list = []
        stay = threading.Thread(target=lambda: staying.append(s.client().chat.completions.create(
            model="endless", messages=[user("Stay?", second_image)], max_tokens=200)))
        stay.start()
        deadline = time.time() + 30
        while s.stats()["slots_busy"] < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert s.stats()["slots_busy"] == 2  # both generating at once
        leaving.close()  # this app goes away mid-answer
        stay.join(120)
        deadline = time.time() + 30
        while s.stats()["slots_busy"] and time.time() < deadline:
            time.sleep(0.05)
        stats = s.stats()
    finally:
        s.stop()
    assert staying[0].choices[0].message.content == alone.choices[0].message.content
    assert staying[0].choices[0].finish_reason == "length"
    assert stats["slots_busy"] == 0 and stats["requests"] == 2


def test_ctrl_c_during_a_parallel_caption_run(endless, tmp_path, noise_image, second_image):
    """SIGINT while four pictures decode together: exit 130, one line, only whole records of finished
    pictures (none of the cancelled ones), and the next run captions exactly the rest."""
    folder = tmp_path / "pics"
    rotated_pictures(folder, 12, 20, noise_image, second_image)
    out = tmp_path / "out.jsonl"
    cmd = parallel_caption(folder, endless, out, 400)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_lines(out, 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["interrupted"]
    written = [json.loads(line) for line in out.read_text().splitlines()]  # every line whole
    assert 2 <= len(written) < 12 and all(r["finish_reason"] == "length" for r in written)
    done = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300)
    assert json.loads(done.stdout)["skipped"] == len(written)
    assert sorted(json.loads(line)["image"] for line in out.read_text().splitlines()) == \
        [str(p) for p in sorted(folder.iterdir())]


def test_each_slot_keeps_its_own_sampling(endless, noise_image):
    """Stop strings, a JSON grammar and seeded sampling per request, four requests decoded together:
    each answer is the one it gets alone."""
    settings = [{}, {"response_format": {"type": "json_object"}}, {"temperature": 0.9, "seed": 5}, {"max_tokens": 7}]

    def ask(server, i):
        return server.client().chat.completions.create(**{"model": "endless", "max_tokens": 60,
                                                          "messages": [user(f"Q{i}?", noise_image)], **settings[i]})

    one = Server(endless, "--parallel", "1", quant="F16")
    try:
        plain = ask(one, 0).choices[0].message.content
        settings[0] = {"stop": [plain[20:23]]}  # a stop string its answer reaches
        alone = [ask(one, i).choices[0] for i in range(4)]
    finally:
        one.stop()
    four = Server(endless, "--parallel", "4", quant="F16")
    try:
        together = [None] * 4
        barrier = threading.Barrier(4)

        def run(i):
            barrier.wait()
            together[i] = ask(four, i).choices[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = four.stats()
    finally:
        four.stop()
    assert [(c.message.content, c.finish_reason) for c in together] == \
        [(c.message.content, c.finish_reason) for c in alone]
    assert alone[0].finish_reason == "stop" and alone[0].message.content == plain[:plain.index(plain[20:23])]
    assert alone[1].message.content.lstrip().startswith("{")  # the grammar held, next to the others
    assert alone[3].finish_reason == "length"
    assert stats["decoded_tokens"] > stats["decode_steps"]


def test_more_conversations_than_slots_keep_their_caches_through_the_store(converted, noise_image, second_image):
    """Three clients taking turns on two slots: the conversation whose slot is taken is saved and
    restored into another, so every follow-up is served from a cache and no picture is encoded twice."""
    s = Server(converted, "--parallel", "2")
    try:
        client = s.client()
        talks = [[user(f"Describe {name}.", image)] for name, image in (("A", noise_image), ("B", second_image),
                                                                         ("C", noise_image))]
        cached, prompts = [], []
        for turn in range(3):
            for messages in talks:
                reply = client.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=3)
                cached.append(reply.usage.prompt_tokens_details.cached_tokens)
                prompts.append(reply.usage.prompt_tokens)
                messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                             {"role": "user", "content": f"And {turn}?"}]
        stats = s.stats()
    finally:
        s.stop()
    # from the second turn on, each request finds at least its previous prompt in some cache
    assert all(c >= p for c, p in zip(cached[3:], prompts))
    assert stats["images_encoded"] <= 3  # each conversation's picture once at most, never again on a follow-up
    assert stats["state_cache"]["hits"] >= 3 and stats["slots"] == 2
