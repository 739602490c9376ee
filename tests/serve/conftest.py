"""Fixtures of the serve tests: the folder served (a tiny random Llama with a chat template), servers to start."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("starlette", reason="`strataprune serve` needs the serve extra: pip install 'strataprune[serve]'")
pytest.importorskip("uvicorn", reason="`strataprune serve` needs the serve extra")
pytest.importorskip("prometheus_client", reason="`strataprune serve` needs the serve extra")
pytest.importorskip("httpx", reason="the serve tests talk HTTP through httpx")

from serving import CHAT_TEMPLATE, ServerProcess  # noqa: E402


@pytest.fixture(scope="session")
def served_dir(tmp_path_factory) -> Path:
    from strataprune.testing import tiny_llama_dir

    folder = tiny_llama_dir(tmp_path_factory.mktemp("served") / "tiny")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return folder


@pytest.fixture
def start_server(served_dir) -> Iterator[Any]:
    started: list[ServerProcess] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(served_dir, *flags, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()
