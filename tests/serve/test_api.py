"""The real server (a subprocess on 127.0.0.1): completions, streaming, chat template, every bad input class."""

from __future__ import annotations

import json

import httpx
import pytest
from serving import CHAT_TEMPLATE, greedy_reference, stream_chunks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(served_dir):
    from serving import ServerProcess

    process = ServerProcess(served_dir, "--max-running", "4", "--max-body-bytes", "4096")
    yield process
    process.kill()


@pytest.fixture(scope="module")
def tokenizer(served_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(served_dir)


def post(server, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=120, **kwargs)


def test_greedy_completion_matches_a_plain_loop(server, served_dir, tokenizer):
    r = post(server, "/v1/completions", {"prompt": "The quick brown", "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == served_dir.name
    choice = body["choices"][0]
    prompt = tokenizer.encode("The quick brown")
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 12, "total_tokens": len(prompt) + 12}
    assert choice["finish_reason"] == "length"
    assert choice["text"] == tokenizer.decode(greedy_reference(served_dir, prompt, 12), skip_special_tokens=True)


def test_token_id_prompt_and_default_length(server, tokenizer):
    ids = tokenizer.encode("hello")
    by_ids = post(server, "/v1/completions", {"prompt": ids, "temperature": 0, "ignore_eos": True}).json()
    by_text = post(server, "/v1/completions", {"prompt": ["hello"], "temperature": 0, "ignore_eos": True}).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens for completions


def test_seed_reproduces_sampling(server):
    body = {"prompt": "Once upon", "max_tokens": 24, "temperature": 1.0, "top_p": 0.9, "seed": 7, "ignore_eos": True}
    first, second = (post(server, "/v1/completions", body).json()["choices"][0]["text"] for _ in range(2))
    others = {post(server, "/v1/completions", {**body, "seed": s}).json()["choices"][0]["text"] for s in (8, 9, 10)}
    assert first == second
    assert others - {first}  # other seeds draw other text


def test_streaming_equals_the_whole_answer(server):
    body = {"prompt": "stream me", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    whole = post(server, "/v1/completions", body).json()
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = list(stream_chunks(r))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"] == whole["usage"]


def test_stop_string_ends_the_text(server):
    body = {"prompt": "abc", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    text = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    stop = text[10:13]
    cut = text.find(stop)
    for stream in (False, True):
        if stream:
            with httpx.stream(
                "POST", server.url + "/v1/completions", json={**body, "stop": [stop], "stream": True}, timeout=120
            ) as r:
                chunks = list(stream_chunks(r))
            got, reason = "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]
        else:
            choice = post(server, "/v1/completions", {**body, "stop": stop}).json()["choices"][0]
            got, reason = choice["text"], choice["finish_reason"]
        assert (got, reason) == (text[:cut], "stop")


def test_chat_uses_the_template(server, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    rendered = "<system>be brief\n<user>hi there\n<assistant>"
    assert tokenizer.chat_template == CHAT_TEMPLATE
    chat = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 10, "temperature": 0, "ignore_eos": True})
    assert chat.status_code == 200, chat.text
    plain = post(server, "/v1/completions", {"prompt": rendered, "max_tokens": 10, "temperature": 0, "ignore_eos": True}).json()
    body = chat.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": plain["choices"][0]["text"]}
    assert body["usage"] == plain["usage"] and body["usage"]["prompt_tokens"] == len(tokenizer.encode(rendered))
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json={"messages": messages, "max_tokens": 10, "temperature": 0, "stream": True, "ignore_eos": True},
        timeout=120,
    ) as r:
        chunks = list(stream_chunks(r))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["usage"] == body["usage"] and chunks[-1]["object"] == "chat.completion.chunk"


BAD = [
    ("malformed json", b'{"prompt": "x",', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("NaN is not JSON", b'{"prompt": "x", "temperature": NaN}', 400, None),
    ("unknown field", {"prompt": "x", "max_tokenz": 3}, 400, "max_tokenz"),
    ("missing prompt", {"max_tokens": 3}, 400, "prompt"),
    ("prompt wrong type", {"prompt": 5}, 400, "prompt"),
    ("max_tokens wrong type", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens bool", {"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("max_tokens zero", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens past the context", {"prompt": "x", "max_tokens": 1000}, 400, "max_tokens"),
    ("prompt longer than the context", {"prompt": "y" * 300}, 400, "prompt"),
    ("token id out of range", {"prompt": [1, 2, 999]}, 400, "prompt"),
    ("temperature out of range", {"prompt": "x", "temperature": 3}, 400, "temperature"),
    ("top_p zero", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("stop wrong type", {"prompt": "x", "stop": 3}, 400, "stop"),
    ("too many stops", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("n > 1", {"prompt": "x", "n": 2}, 400, "n"),
    ("unsupported logprobs", {"prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ("seed wrong type", {"prompt": "x", "seed": 1.5}, 400, "seed"),
    ("stream wrong type", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("unknown model", {"prompt": "x", "model": "gpt-9"}, 404, "model"),
    ("body too large", {"prompt": "z" * 5000}, 413, None),
]
BAD_CHAT = [
    ("no messages", {"max_tokens": 2}, 400, "messages"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("content wrong type", {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    ("unknown message field", {"messages": [{"role": "user", "content": "x", "mood": "happy"}]}, 400, "messages[0].mood"),
    (
        "both max fields",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "max_completion_tokens": 2},
        400,
        "max_completion_tokens",
    ),
]


@pytest.mark.parametrize(
    "path,case,body,status,param",
    [("/v1/completions", *c) for c in BAD] + [("/v1/chat/completions", *c) for c in BAD_CHAT],
    ids=[c[0] for c in BAD] + ["chat: " + c[0] for c in BAD_CHAT],
)
def test_bad_input_is_a_4xx_naming_the_field(server, path, case, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, (case, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if param:
        assert param in error["message"]


def test_routes_and_the_server_survives(server, served_dir):
    assert httpx.get(server.url + "/v1/completions", timeout=10).status_code == 405
    missing = httpx.get(server.url + "/nowhere", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()
    models = httpx.get(server.url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [served_dir.name]
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["backend"] == "torch" and health["batching"] == "continuous"
    assert "text/html" in httpx.get(server.url + "/", timeout=10).headers["content-type"]
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    for name in (
        "requests_total",
        "time_to_first_token_seconds",
        "time_per_output_token_seconds",
        "e2e_request_latency_seconds",
        "prompt_tokens_total",
        "generation_tokens_total",
        "requests_running",
        "requests_waiting",
        "decode_batch_size",
        "kv_cache_bytes",
    ):
        assert f"strataprune_serve_{name}" in metrics, name
    assert server.metric("requests_total", 'endpoint="completions",status="400"') >= 10
    assert server.proc.poll() is None
