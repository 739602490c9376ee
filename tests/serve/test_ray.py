"""`strataprune serve --ray --replicas 2`: the real CLI on a local Ray instance it starts, against the single-process server.

One module-scoped Ray server (Ray's start and two model loads take 20-60 s on two busy cores) serves every test;
the last test stops it with SIGTERM and checks the drain and that no Ray process is left.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serving import ServerProcess, greedy_reference, stream_chunks

from strataprune.cli import main

REPLICA_HEADER = "x-strataprune-replica"
FLAGS = ("--max-running", "4", "--max-body-bytes", "4096")


def ray_serve_missing() -> str:
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        return f"Ray Serve is the optional extra 'ray-serve' (pip install 'strataprune[ray-serve]'): {exc}"
    return ""


# slow like the other tests of a real server; skipped with the reason where the extra is not installed
needs_ray = pytest.mark.skipif(bool(ray_serve_missing()), reason=ray_serve_missing() or "Ray Serve is installed")


@pytest.fixture(scope="module")
def single(served_dir):
    server = ServerProcess(served_dir, *FLAGS)
    yield server
    server.kill()


@pytest.fixture(scope="module")
def on_ray(served_dir):
    server = ServerProcess(served_dir, "--ray", "--replicas", "2", *FLAGS, start_seconds=240)
    yield server
    if server.proc.poll() is None:  # the last test stops it itself; this is for a failure before it
        server.terminate()
        try:
            server.proc.wait(90)
        except Exception:  # noqa: BLE001
            server.kill()


@pytest.fixture(scope="module")
def tokenizer(served_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(served_dir)


def post(server, body, path: str = "/v1/completions") -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=120)


def streamed(server, body) -> tuple[str, dict, str]:
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        chunks = list(stream_chunks(r))
        replica = r.headers[REPLICA_HEADER]
    return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["usage"], replica


@pytest.mark.slow  # a real server, like the other serve tests
@needs_ray
def test_greedy_answers_equal_the_single_process_server_token_for_token(on_ray, single, served_dir, tokenizer):
    prompts = ["The quick brown", "Once upon a time", "zebra", "1 2 3 4"]
    bodies = [{"prompt": tokenizer.encode(p), "max_tokens": 12, "temperature": 0, "ignore_eos": True} for p in prompts]
    answers: dict[int, httpx.Response] = {}

    def ask(i: int) -> None:
        answers[i] = post(on_ray, bodies[i % len(bodies)])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]  # concurrent: both replicas get work
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(answers) == list(range(8)) and all(r.status_code == 200 for r in answers.values())
    for i, answer in answers.items():
        body = bodies[i % len(bodies)]
        reference = post(single, body).json()
        got = answer.json()
        assert got["choices"] == reference["choices"] and got["usage"] == reference["usage"]
        assert got["model"] == reference["model"] == served_dir.name
    # token for token: the text is that of the plain greedy loop's tokens
    first = answers[0].json()["choices"][0]["text"]
    assert first == tokenizer.decode(greedy_reference(served_dir, bodies[0]["prompt"], 12), skip_special_tokens=True)
    # streamed: the same text and usage, through Ray Serve's proxy
    text, usage, _ = streamed(on_ray, bodies[1])
    assert text == post(single, bodies[1]).json()["choices"][0]["text"] and usage == answers[1].json()["usage"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    assert (
        post(on_ray, chat, "/v1/chat/completions").json()["choices"]
        == post(single, chat, "/v1/chat/completions").json()["choices"]
    )
    on_ray.seen = {r.headers[REPLICA_HEADER] for r in answers.values()}


@pytest.mark.slow  # a real server, like the other serve tests
@needs_ray
def test_both_replicas_answer_and_name_themselves(on_ray):
    seen: set[str] = set(getattr(on_ray, "seen", set()))
    for _ in range(40):  # Ray Serve's proxy picks the less busy of two random replicas: idle, a coin flip each
        if len(seen) == 2:
            break
        r = httpx.get(on_ray.url + "/health", timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert r.json()["replica"] == r.headers[REPLICA_HEADER]
        seen.add(r.headers[REPLICA_HEADER])
    assert len(seen) == 2 and all(s.startswith("StrataPruneServer#") for s in seen), seen
    models = httpx.get(on_ray.url + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    metrics = httpx.get(on_ray.url + "/metrics", timeout=30)
    assert metrics.status_code == 200 and "strataprune_serve_requests_total" in metrics.text  # one replica's series


@pytest.mark.slow  # a real server, like the other serve tests
@needs_ray
def test_errors_have_the_single_process_shape(on_ray, single):
    cases = [
        ("/v1/completions", {"prompt": "x", "max_tokens": -3}),
        ("/v1/completions", {"prompt": "x", "model": "other"}),
        ("/v1/completions", {"prompt": "x", "bogus": 1}),
        ("/v1/completions", b"{not json"),
        ("/v1/completions", {"prompt": "x" * 5000}),  # over --max-body-bytes 4096: 413
        ("/v1/chat/completions", {"messages": []}),
        ("/no/such/route", {}),
    ]
    for path, body in cases:
        got, reference = post(on_ray, body, path), post(single, body, path)
        assert 400 <= got.status_code < 500 and got.status_code == reference.status_code, (path, body, got.text)
        assert got.json() == reference.json(), (path, body)
        assert set(got.json()["error"]) == {"message", "type", "param", "code"}
    wrong_method = httpx.get(on_ray.url + "/v1/completions", timeout=30)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"


def _descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` with its command line (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            todo.append(child)
    return found


def _alive(pid: int, command: str) -> bool:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
        now = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and now == command


@pytest.mark.slow  # a real server, like the other serve tests
@needs_ray
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
def test_sigterm_drains_every_replica_then_leaves_no_ray_process(on_ray):
    ray_processes = _descendants(on_ray.proc.pid)
    assert any("raylet" in c for c in ray_processes.values()), ray_processes  # the command started its own Ray
    long = {"prompt": "go", "max_tokens": 240, "temperature": 0, "ignore_eos": True, "stream": True}
    results: list[list[dict]] = []

    def stream() -> None:
        with httpx.stream("POST", on_ray.url + "/v1/completions", json=long, timeout=180) as r:
            results.append(list(stream_chunks(r)))

    streams = [threading.Thread(target=stream) for _ in range(4)]
    for t in streams:
        t.start()
    time.sleep(1.0)
    on_ray.terminate()
    deadline = time.monotonic() + 30
    refused = None
    while time.monotonic() < deadline:  # while the streams run, new requests get the single server's 503
        r = post(on_ray, {"prompt": "x", "max_tokens": 2})
        if r.status_code == 503:
            refused = r
            break
        time.sleep(0.1)
    assert refused is not None and refused.json()["error"]["code"] == "shutting_down", on_ray.log()
    for t in streams:
        t.join(180)
    assert len(results) == 4 and all(chunks[-1]["usage"]["completion_tokens"] == 240 for chunks in results)
    assert on_ray.proc.wait(120) == 0, on_ray.log()
    assert "stopped" in on_ray.log()
    time.sleep(1.0)  # the raylet's workers exit after it
    left = {pid: command for pid, command in ray_processes.items() if _alive(pid, command)}
    assert not left, left


def test_bad_ray_flags_are_one_error_line(served_dir, capsys, monkeypatch):
    cases = [
        (["--ray", "--replicas", "0"], "--replicas 0; allowed: an integer in [1, 256]"),
        (["--replicas", "2"], "--replicas 2 needs --ray"),
        (["--ray", "--replica-cpus", "0"], "--replica-cpus 0"),
        (["--ray", "--ray-address", "127.0.0.1:1"], "--ray-address '127.0.0.1:1': nothing answers there"),
        (["--ray", "--ray-address", "no-port"], "--ray-address 'no-port'; allowed: auto"),
    ]
    for flags, needle in cases:
        assert main(["serve", str(served_dir), "--port", "0", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
        assert [line for line in err.splitlines() if line.startswith("error: ")] == [err.splitlines()[-1]]
    for module in ("ray", "ray.serve"):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)  # as if not installed
            assert main(["serve", str(served_dir), "--ray"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "pip install 'strataprune[ray-serve]'" in err and "Traceback" not in err, err
