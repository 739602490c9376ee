"""Helpers of the serve tests: the real server in a subprocess on 127.0.0.1 (a free port it picks), SSE parsing, a reference."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx

#: a chat template simple enough to render by hand in the tests
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
REPOSITORY = Path(__file__).resolve().parents[1]


class ServerProcess:
    def __init__(self, folder: Path, *flags: str, env: dict[str, str] | None = None, start_seconds: float = 60) -> None:
        command = [sys.executable, "-m", "strataprune", "serve", str(folder), "--port", "0", "--threads", "1", *flags]
        environment = {k: v for k, v in os.environ.items() if k != "STRATAPRUNE_API_KEY"}  # only what a test gives
        environment.update({"PYTHONPATH": str(REPOSITORY), **(env or {})})
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=environment)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.url = self._wait_for_url(start_seconds)
        self.wait_healthy(180)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        return "\n".join(self.lines)

    def _wait_for_url(self, seconds: float) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
                if found:
                    return found.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"the server did not start:\n{self.log()}")

    def wait_healthy(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).json().get("status") == "ok":
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, f"the server exited:\n{self.log()}"
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"the server did not become healthy:\n{self.log()}")

    def metric(self, name: str, labels: str = "", headers: dict[str, str] | None = None) -> float:
        """The value of one series in /metrics (0 when absent)."""
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=10).text
        series = f"strataprune_serve_{name}{{{labels}}}" if labels else f"strataprune_serve_{name}"
        for line in text.splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        return 0.0

    def wait_metric(self, name: str, predicate: Any, labels: str = "", seconds: float = 30) -> float:
        deadline = time.monotonic() + seconds
        value = self.metric(name, labels)
        while not predicate(value) and time.monotonic() < deadline:
            time.sleep(0.05)
            value = self.metric(name, labels)
        return value

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def stream_chunks(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The JSON chunks of a server-sent event stream, up to [DONE]."""
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return
        yield json.loads(line[6:])


_MODELS: dict[Path, Any] = {}


def greedy_reference(folder: Path, prompt_ids: list[int], steps: int) -> list[int]:
    """Greedy tokens from a plain loop: the full sequence through the model at every step, no cache, no batching."""
    import torch
    from transformers import AutoModelForCausalLM

    if folder not in _MODELS:
        _MODELS[folder] = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    model = _MODELS[folder]
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt_ids) :]
