"""`selfcog serve`: the OpenAI-compatible API, checked with the official `openai` client on a real port."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from selfcog.generate import SamplingArgs, stream_chat
from selfcog.serve import StopStrings, create_app, listening

KEY = "sk-test-key"
ASK = [{"role": "user", "content": "你是谁？Who are you?"}]
SEEDED = dict(temperature=0.8, max_tokens=24, seed=1)


@pytest.fixture(scope="module")
def expected(tiny):
    """The answer the server must give (same generator, settings and seed)."""
    torch.manual_seed(1)
    answer = "".join(stream_chat(*tiny, ASK, SamplingArgs(max_new_tokens=24, temperature=0.8))).strip()
    assert len(answer) > 10
    return answer


@pytest.fixture(scope="module")
def server(tiny, free_port):
    """create_app on a free loopback port, uvicorn in a thread."""
    app = create_app(*tiny, "tiny", api_key=KEY)
    with serving(app, free_port()) as url:
        yield app, url


@contextmanager
def serving(app, port: int):
    """uvicorn serving `app` on the loopback `port` in a thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_lists_the_model(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_non_streamed_answer(client, expected):
    reply = client.chat.completions.create(model="tiny", messages=ASK, **SEEDED)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 24 and reply.usage.prompt_tokens > 5


def test_streamed_answer(client, expected):
    stream = client.chat.completions.create(model="tiny", messages=ASK, stream=True,
                                            stream_options={"include_usage": True}, **SEEDED)
    chunks = list(stream)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(content).strip() == expected and len(content) > 1
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 24


def test_sse_wire_format_ends_with_done(server):
    _, url = server
    body = {"messages": ASK, "stream": True, "max_tokens": 4}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_wrong_or_missing_key_is_401(server):
    _, url = server
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    response = httpx.post(url + "/v1/chat/completions", json={"messages": ASK})
    assert response.status_code == 401
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(url + "/health").status_code == 200  # no key needed


def test_malformed_bodies_are_4xx(server, client):
    _, url = server
    response = httpx.post(url + "/v1/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=ASK, temperature=-1)
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="gpt-4o", messages=ASK)


def test_disconnect_mid_stream_stops_generation(server, monkeypatch):
    app, url = server
    stats = app.state.worker.stats
    # The tiny model's weights are random: a sampled end token could finish the answer before the hang-up is seen,
    # and an answer that ends by itself is completed, not cancelled. No end token before max_tokens here.
    monkeypatch.setattr(app.state.worker, "min_new", 400)
    before = stats["cancelled"]
    body = {"messages": ASK, "stream": True, "max_tokens": 400, "temperature": 1.0, "seed": 1}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        next(response.iter_lines())  # the first event arrived: generation is under way; now hang up
    deadline = time.monotonic() + 20
    while stats["cancelled"] == before:
        assert time.monotonic() < deadline, f"generation was not stopped: {stats}"
        time.sleep(0.05)


def test_without_batching_requests_are_queued_and_all_answered(tiny, monkeypatch):
    """Four requests at once with batching off: one generation at a time, the others wait, all get answered."""
    import selfcog.serve

    app = create_app(*tiny, "tiny", batching=False)
    worker = app.state.worker
    lock, running, seen = threading.Lock(), [0], []  # seen: (generations running, requests in the worker) at starts
    plain = selfcog.serve.stream_ids

    def watched(*args, **kwargs):
        with lock:
            running[0] += 1
            seen.append((running[0], worker.waiting))
        try:
            time.sleep(0.3)  # long enough for the other requests to arrive while this one generates
            yield from plain(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(selfcog.serve, "stream_ids", watched)
    with TestClient(app) as client:
        results = asked_at_once(client, 4)
    assert all(1 <= reply["usage"]["completion_tokens"] <= 6 for reply in results)
    assert len(seen) == 4 and worker.stats["completed"] == 4
    assert max(running for running, _ in seen) == 1, seen  # never two generations at once
    assert max(waiting for _, waiting in seen) >= 3, seen  # a generation started with requests queued behind it


def asked_at_once(client, count: int, model: str = "tiny") -> list[dict]:
    results, errors = [None] * count, []

    def ask(i):
        try:
            response = client.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 6,
                "temperature": 0})
            assert response.status_code == 200, response.text
            results[i] = response.json()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_batched_requests_decode_together_and_match_one_at_a_time(tiny):
    with TestClient(create_app(*tiny, "tiny", batching=False)) as client:
        one_at_a_time = asked_at_once(client, 6)
    app = create_app(*tiny, "tiny")
    with TestClient(app) as client:
        batched = asked_at_once(client, 6)
    assert [r["choices"][0]["message"]["content"] for r in batched] == \
        [r["choices"][0]["message"]["content"] for r in one_at_a_time]
    assert [r["usage"] for r in batched] == [r["usage"] for r in one_at_a_time]
    assert app.state.worker.stats["completed"] == 6 and app.state.worker.stats["largest_batch"] > 1


def test_stop_strings_cut_the_answer(client, expected):
    stop = expected[len(expected) // 2:][:3]
    assert stop.strip(), expected
    reply = client.chat.completions.create(model="tiny", messages=ASK, stop=[stop], **SEEDED)
    assert reply.choices[0].message.content == expected[:expected.index(stop)].strip()
    assert reply.choices[0].finish_reason == "stop"
    pieces = StopStrings(["END"])
    assert [pieces.feed(p) for p in ["ab", "cE", "N", "Dx"]] == ["ab", "c", "", ""] and pieces.hit


@pytest.mark.parametrize("body, status, param", [
    ({"messages": ASK, "temperature": -0.1}, 400, "temperature"),
    ({"messages": ASK, "top_p": 0}, 400, "top_p"),
    ({"messages": ASK, "top_p": 1.5}, 400, "top_p"),
    ({"messages": ASK, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    ({}, 400, "messages"),
    ({"messages": ASK, "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages"),
    ({"messages": ASK, "model": "other"}, 404, "model"),
    ([1, 2], 400, None),
])
def test_validation_errors_are_openai_shaped(tiny, body, status, param):
    client = TestClient(create_app(*tiny, "tiny"))
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_in_process_without_key(tiny):
    with TestClient(create_app(*tiny, "tiny")) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
        reply = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 3}).json()
        assert reply["choices"][0]["message"]["role"] == "assistant" and reply["usage"]["completion_tokens"] <= 3
        assert client.get("/nowhere").json()["error"]["message"] == "unknown path /nowhere"


def test_full_queue_is_503_overloaded(tiny):
    client = TestClient(create_app(*tiny, "tiny", max_queue=0))
    response = client.post("/v1/chat/completions", json={"messages": ASK})
    assert response.status_code == 503 and response.json()["error"]["code"] == "overloaded"


def test_cli_reports_a_busy_port_in_one_line(tiny_model_dir):
    from click.testing import CliRunner

    from selfcog.cli import main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", str(tiny_model_dir), "--port", str(port)])
    assert result.exit_code == 2 and "cannot listen" in result.stderr


@pytest.fixture(scope="module")
def identities_server(tiny_model_dir, free_port):
    """Two LoRA identities and the bare base behind one server (uvicorn in a thread)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from selfcog.chat import load_identities

    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        peft = get_peft_model(LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32),
                              LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False))
        path = tiny_model_dir.parent / f"identity-adapter-{seed}"
        peft.save_pretrained(path)
        paths.append(str(path))
    model, tokenizer, identities = load_identities(str(tiny_model_dir), [("alice", paths[0]), ("伍鲜", paths[1])],
                                                   "tiny")
    app = create_app(model, tokenizer, "tiny", identities=identities, max_body_bytes=4096)
    with serving(app, free_port()) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60), \
            (model, tokenizer, identities)


def test_two_identities_through_one_server(identities_server):
    client, (model, tokenizer, identities) = identities_server
    assert [m.id for m in client.models.list()] == ["tiny", "alice", "伍鲜"]
    greedy = dict(temperature=0, max_tokens=16, extra_body={"repetition_penalty": 3.0})
    args = SamplingArgs(max_new_tokens=16, temperature=0, repetition_penalty=3.0)
    answers = {}

    def ask(name):
        answers[name] = client.chat.completions.create(model=name, messages=ASK, **greedy).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(name,)) for name in identities for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, adapter in identities.items():
        alone = "".join(stream_chat(model, tokenizer, ASK, args, adapter=adapter)).strip()
        assert answers[name] == alone
    assert len(set(answers.values())) == 3  # three identities, three answers
    streamed = client.chat.completions.create(model="伍鲜", messages=ASK, stream=True, **greedy)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip() == answers["伍鲜"]
    with pytest.raises(openai.NotFoundError, match="alice"):
        client.chat.completions.create(model="bob", messages=ASK)


def test_request_body_over_the_limit_is_413(identities_server):
    client = identities_server[0]
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="alice", messages=[{"role": "user", "content": "x" * 5000}])
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "request_too_large"


def test_prompt_longer_than_the_context_is_400_unless_trimming(identities_server):
    """The tiny model has 512 positions: a 40-turn conversation does not fit."""
    client = identities_server[0]
    long = []
    for i in range(40):
        long += [{"role": "user", "content": f"question {i} word word"}, {"role": "assistant", "content": f"a{i}"}]
    long.append({"role": "user", "content": "last"})
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=long[-81:], max_tokens=4)
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "messages"
    reply = client.chat.completions.create(model="tiny", messages=long[-81:], max_tokens=4,
                                           extra_body={"trim_history": True})
    assert 0 < reply.usage.prompt_tokens < 512 and reply.usage.completion_tokens <= 4


def test_non_loopback_host_needs_a_key_or_no_auth(tiny_model_dir, free_port):
    from click.testing import CliRunner

    from selfcog.cli import main

    result = CliRunner().invoke(main, ["serve", str(tiny_model_dir), "--host", "0.0.0.0", "--port", str(free_port())])
    assert result.exit_code == 2 and "--api-key" in result.stderr and "--no-auth" in result.stderr


def wait_for_port(port: int, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"nothing listens on {port} after {timeout}s")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_ends_on_signal_and_frees_the_port(tiny_model_dir, free_port, signum):
    import os
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "selfcog", "serve", str(tiny_model_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        wait_for_port(port, proc)
        proc.send_signal(signum)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not listening(port)
