"""The real server under stress: a full queue (429), API keys (401), client disconnects, timeouts, SIGTERM."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from serving import stream_chunks

from strataprune.cli import main

pytestmark = pytest.mark.slow

LONG = {"prompt": "go", "max_tokens": 240, "temperature": 0, "ignore_eos": True}


def open_stream(server, body: dict, headers: dict | None = None):
    """A streaming request whose first chunk has arrived: (client, response, chunk iterator)."""
    client = httpx.Client(timeout=120)
    response = client.send(
        client.build_request("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=headers), stream=True
    )
    chunks = stream_chunks(response)
    next(chunks)
    return client, response, chunks


def test_full_queue_is_429_and_a_disconnect_frees_its_slot(start_server):
    server = start_server("--max-running", "1", "--max-queue", "1")
    client, response, _ = open_stream(server, LONG)  # holds the only slot
    queued: dict[str, int] = {}
    waiter = threading.Thread(
        target=lambda: queued.update(
            status=httpx.post(server.url + "/v1/completions", json={"prompt": "q", "max_tokens": 2}, timeout=120).status_code
        )
    )
    waiter.start()
    assert server.wait_metric("requests_waiting", lambda v: v == 1) == 1
    refused = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    response.close()  # the client goes away mid-stream
    client.close()
    assert server.wait_metric("cancelled_requests_total", lambda v: v >= 1, 'reason="disconnect"') == 1
    waiter.join(60)
    assert queued["status"] == 200  # the freed slot served the queued request
    assert server.wait_metric("requests_running", lambda v: v == 0) == 0
    assert server.metric("kv_cache_bytes") == 0
    assert server.metric("requests_total", 'endpoint="completions",status="429"') == 1
    # a client of a non-streaming request that goes away frees its slot too
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps(LONG).encode()
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert server.wait_metric("requests_running", lambda v: v == 1) == 1
    assert server.wait_metric("cancelled_requests_total", lambda v: v >= 2, 'reason="disconnect"') == 2
    assert server.wait_metric("requests_running", lambda v: v == 0) == 0
    assert server.metric("kv_cache_bytes") == 0


def test_api_key_and_timeout(start_server):
    server = start_server("--timeout", "0.5", env={"STRATAPRUNE_API_KEY": "s3cret"})
    body = {"prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(server.url + "/metrics", timeout=30).status_code == 401
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200  # open to load balancers
    good = {"Authorization": "Bearer s3cret"}
    assert httpx.get(server.url + "/v1/models", headers=good, timeout=30).status_code == 200
    slow = httpx.post(server.url + "/v1/completions", json={**LONG, "max_tokens": 250 - 1}, headers=good, timeout=60)
    if slow.status_code == 200:  # only a machine that decodes 249 tokens in 0.5 s gets here
        pytest.skip("the tiny model finished 249 tokens inside the 0.5 s timeout on this machine")
    assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout"
    text = httpx.get(server.url + "/metrics", headers=good, timeout=30).text
    assert 'strataprune_serve_cancelled_requests_total{reason="timeout"} 1.0' in text


def test_sigterm_finishes_the_request_in_flight_and_refuses_new_ones(start_server):
    server = start_server()
    client, response, chunks = open_stream(server, {**LONG, "max_tokens": 120})
    server.terminate()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "SIGTERM" not in server.log():
        time.sleep(0.05)
    refused = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert httpx.get(server.url + "/health", timeout=30).json()["status"] == "draining"
    rest = list(chunks)
    response.close()
    client.close()
    assert rest[-1]["choices"][0]["finish_reason"] == "length" and rest[-1]["usage"]["completion_tokens"] == 120
    assert server.proc.wait(60) == 0, server.log()
    assert "stopped" in server.log()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["serve", "/no/such/folder"], "is not a folder"),
        (["serve", "FOLDER", "--max-running", "0"], "--max-running 0"),
        (["serve", "FOLDER", "--timeout", "-1"], "--timeout -1"),
        (["serve", "FOLDER", "--backend", "nope"], "nope"),
        (["serve", "FOLDER", "--max-running", "8", "--max-batched-tokens", "4"], "--max-batched-tokens 4"),
    ],
)
def test_bad_flags_are_one_error_line(argv, needle, served_dir, capsys):
    assert main([str(served_dir) if a == "FOLDER" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err
