"""A real `moeflow serve` process on localhost, driven by the official openai client."""

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model, *extra: str):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moeflow.cli",
            "serve",
            "--model",
            str(model),
            "--port",
            str(port),
            "--served-model-name",
            "demo",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read())
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module")
def server(chat_model):
    proc, base = start(chat_model, "--max-batch", "8")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)


def metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def greedy(client, prompt, n=16, **kw):
    r = client.completions.create(
        model="demo", prompt=prompt, max_tokens=n, temperature=0, extra_body={"ignore_eos": True}, **kw
    )
    return r.choices[0].text


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["demo"]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_completion_and_usage(client):
    r = client.completions.create(
        model="demo", prompt="Hello", max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7


def test_streaming_equals_whole(client):
    whole = greedy(client, "Streams", 20)
    chunks = client.completions.create(
        model="demo",
        prompt="Streams",
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    parts, usage = [], None
    for c in chunks:
        parts += [ch.text for ch in c.choices]
        usage = c.usage or usage
    assert "".join(parts) == whole
    assert usage.completion_tokens == 20


def test_chat_whole_and_streamed(client):
    msgs = [{"role": "user", "content": "Say something"}]
    r = client.chat.completions.create(
        model="demo", messages=msgs, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].message.role == "assistant"
    s = client.chat.completions.create(
        model="demo",
        messages=msgs,
        max_tokens=10,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    text = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
    assert text == r.choices[0].message.content


def test_stop_string(client):
    full = greedy(client, "Functions", 30)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    r = client.completions.create(
        model="demo",
        prompt="Functions",
        max_tokens=30,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]


def test_seed_repeats_and_n(client):
    def run(seed):
        r = client.completions.create(
            model="demo",
            prompt="Random",
            max_tokens=12,
            temperature=1.0,
            seed=seed,
            n=2,
            extra_body={"ignore_eos": True},
        )
        return [c.text for c in r.choices]

    a, b = run(5), run(5)
    assert a == b and len(a) == 2 and a[0] != a[1]


def test_eight_concurrent_streams_equal_alone(client):
    prompts = [f"Prompt number {i} says" for i in range(8)]
    alone = [greedy(client, p, 24) for p in prompts]

    def streamed(p):
        s = client.completions.create(
            model="demo", prompt=p, max_tokens=24, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        return "".join(c.choices[0].text for c in s if c.choices)

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(streamed, prompts))
    assert together == alone


def test_moe_top_k_extension(client):
    r = client.completions.create(
        model="demo",
        prompt="Fewer experts",
        max_tokens=5,
        temperature=0,
        extra_body={"moe": {"top_k": 1}, "ignore_eos": True},
    )
    assert r.usage.completion_tokens == 5
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="demo", prompt="x", max_tokens=2, extra_body={"moe": {"top_k": 99}})


def test_disconnect_frees_slot(server):
    before = metric(server, "moeflow_requests_aborted")
    body = {"model": "demo", "prompt": "Long", "max_tokens": 1000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as r:
        next(r.iter_lines())  # first chunk arrived: the request is running
    for _ in range(100):
        if (
            metric(server, "moeflow_requests_aborted") > before
            and metric(server, "moeflow_requests_running") == 0
        ):
            break
        time.sleep(0.1)
    assert metric(server, "moeflow_requests_aborted") == before + 1
    assert metric(server, "moeflow_kv_slots_free") == 8


@pytest.mark.parametrize(
    "path,body,status,needle",
    [
        ("/v1/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/chat/completions", b'{"model": "demo"}', 400, "messages"),
        ("/v1/completions", b'{"model": "demo"}', 400, "prompt"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": -2}', 400, "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
        ("/v1/completions", b'{"prompt": "' + b"word " * 3000 + b'"}', 400, "context holds"),
        ("/v1/completions", b'{"model": "gpt-9", "prompt": "x"}', 404, "gpt-9"),
    ],
)
def test_bad_requests(server, client, path, body, status, needle):
    r = httpx.post(f"{server}{path}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]
    assert greedy(client, "still serving", 3)  # and the server keeps working


def test_queue_full_answers_503(chat_model):
    proc, base = start(chat_model, "--max-waiting", "0")
    try:
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "server_overloaded"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_expert_budget_serves_same_text_with_cache_metrics(chat_model, client):
    """With experts read from disk under a budget, answers are unchanged and /metrics counts
    the expert cache's hits, misses and bytes."""
    proc, base = start(chat_model, "--expert-memory", "25%", "--expert-policy", "lfu")
    try:
        tiered = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        prompt = "Return the number of items in a container."
        assert greedy(tiered, prompt, 12) == greedy(client, prompt, 12)
        assert metric(base, "moeflow_expert_cache_misses_total") > 0
        assert metric(base, "moeflow_expert_cache_hits_total") > 0
        assert metric(base, "moeflow_expert_cache_bytes_read_total") > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_failing_engine_step_answers_500_and_the_server_lives(chat_model, tmp_path):
    """A checkpoint truncated under a budgeted store: the request in flight gets a 500 with an
    OpenAI-style body, /health still answers, and once the file is whole requests succeed."""
    import shutil

    path = tmp_path / "model"
    shutil.copytree(chat_model, path)
    proc, base = start(path, "--expert-memory", "25%")
    try:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        want = greedy(c, "Return the number of items.", 8)
        (weights,) = path.glob("*.safetensors")
        whole = weights.read_bytes()
        os.truncate(weights, len(whole) // 2)
        with pytest.raises(openai.InternalServerError, match="ended early"):
            greedy(c, "Something else entirely, to miss the cache.", 8)
        assert httpx.get(f"{base}/health").status_code == 200
        with open(weights, "r+b") as f:
            f.write(whole)
        assert greedy(c, "Return the number of items.", 8) == want
    finally:
        proc.terminate()
        proc.wait(timeout=30)
