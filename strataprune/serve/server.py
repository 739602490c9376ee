"""Running the server: bind, load the model in the background, serve on uvicorn, shut down gracefully.

The socket is bound before the model loads (``/health`` answers ``loading`` meanwhile, then ``ok``,
or ``error`` with the reason). SIGTERM or Ctrl-C starts a drain: new requests get 503, requests in
flight run to their end (each is bounded by its timeout), then the process exits with status 0; a
second signal exits at once.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from strataprune.contract.errors import ConfigError


@dataclass
class ServeSettings:
    backend: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_running: int = 8
    max_batched_tokens: int = 2048
    max_queue: int = 64
    timeout: float = 60.0
    api_key: str | None = None
    prefill_chunk: int = 256
    max_body_bytes: int = 1 << 20
    threads: int | None = None
    model_name: str | None = None

    def check(self) -> None:
        """Refuse out-of-range settings, naming the flag."""
        integers = {
            "--max-running": (self.max_running, 1, 1024),
            "--max-batched-tokens": (self.max_batched_tokens, 1, 1 << 20),
            "--max-queue": (self.max_queue, 0, 1 << 20),
            "--prefill-chunk": (self.prefill_chunk, 1, 1 << 20),
            "--max-body-bytes": (self.max_body_bytes, 1024, 1 << 30),
            "--port": (self.port, 0, 65535),
        }
        if self.threads is not None:
            integers["--threads"] = (self.threads, 1, 4096)
        for flag, (value, low, high) in integers.items():
            if not low <= value <= high:
                raise ConfigError(f"{flag} {value}; allowed: an integer in [{low}, {high}]")
        if not 0 < self.timeout <= 86400:
            raise ConfigError(f"--timeout {self.timeout:g}; allowed: seconds in (0, 86400]")
        if self.max_batched_tokens < self.max_running:
            raise ConfigError(
                f"--max-batched-tokens {self.max_batched_tokens} is below --max-running {self.max_running}: "
                "every running sequence needs one token per decode step"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty; give a key or leave it unset")


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(folder: str | Path, settings: ServeSettings, log: Callable[[str], None] | None = None) -> int:
    """Serve ``folder`` until SIGTERM/SIGINT; returns the exit status."""
    import uvicorn

    from strataprune.serve.api import ServerState, create_app
    from strataprune.serve.metrics import ServeMetrics
    from strataprune.serve.model import choose_backend, inspect_folder

    say = log or (lambda message: print(f"[serve] {message}", file=sys.stderr, flush=True))
    settings.check()
    info = inspect_folder(folder)
    backend = choose_backend(info, settings.backend)
    sock = bind_socket(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    metrics = ServeMetrics(settings.max_running)
    state = ServerState(metrics, settings.timeout, settings.max_body_bytes, settings.api_key)
    state.replica = f"{socket.gethostname()}/{os.getpid()}"
    workdir = Path(tempfile.mkdtemp(prefix="strataprune-serve-"))
    loader = threading.Thread(
        target=load_into, args=(state, info, backend, workdir, settings, say), name="strataprune-load", daemon=True
    )
    config = uvicorn.Config(create_app(state), log_level="warning", access_log=False, lifespan="off")
    server = draining_server(config, state, drain_seconds=settings.timeout + 10, log=say)
    say(f"listening on http://{host}:{port} (backend {backend.label()}; loading {info.path})")
    if settings.host not in ("127.0.0.1", "::1", "localhost") and not settings.api_key:
        say(f"warning: listening on {settings.host} without an API key; anyone who can reach it can use it")
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        if state.scheduler is not None:
            state.scheduler.stop()
        if state.model is not None:
            state.model.close()
        shutil.rmtree(workdir, ignore_errors=True)
        sock.close()
    say("stopped")
    return 0


def load_into(state: Any, info: Any, backend: Any, workdir: Path, settings: ServeSettings, say: Callable[[str], None]) -> None:
    """Load the model and start its scheduler into ``state``; a failure sets ``state.status = "error"`` and its reason."""
    from strataprune.serve.model import load_served_model
    from strataprune.serve.scheduler import Scheduler, SchedulerLimits

    start = time.perf_counter()
    try:
        model = load_served_model(
            info, backend, workdir, settings.prefill_chunk, settings.threads, settings.model_name, settings.max_running
        )
        limits = SchedulerLimits(settings.max_running, settings.max_batched_tokens, settings.max_queue, settings.prefill_chunk)
        scheduler = Scheduler(model, limits, state.metrics, log=say)
        scheduler.start()
    except Exception as exc:  # noqa: BLE001 -- reported through /health; the server stays up to say so
        state.error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        state.status = "error"
        say(f"error: the model could not be loaded: {state.error}")
        return
    state.model, state.scheduler = model, scheduler
    if state.status == "loading":
        state.status = "ok"
    say(f"model '{model.model_id}' ready on {model.backend} in {time.perf_counter() - start:.1f} s; {model.batching_note}")
    say(
        f"max running {scheduler.max_running}, max batched tokens {settings.max_batched_tokens}, queue {settings.max_queue}, "
        f"context {model.context_length}; KV cache {model.kv_bytes_per_token} B/token, "
        f"bound {scheduler.kv_bound_bytes() / 2**20:.1f} MiB (max running x context)"
    )


def draining_server(config: Any, state: Any, drain_seconds: float, log: Callable[[str], None]) -> Any:
    """uvicorn's Server with a drain on the first SIGTERM/SIGINT instead of an immediate stop."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # noqa: ARG002 -- the signal-handler signature
            if state.status == "draining" or self.should_exit:
                log("second signal: stopping now")
                self.should_exit = self.force_exit = True
                return
            state.status = "draining"
            log(f"{signal.Signals(sig).name}: refusing new requests, finishing those in flight")
            threading.Thread(target=self._drain, name="strataprune-drain", daemon=True).start()

        def _drain(self) -> None:
            scheduler = state.scheduler
            if scheduler is not None:
                scheduler.drain()
                deadline = time.monotonic() + drain_seconds
                while not scheduler.idle() and time.monotonic() < deadline:
                    time.sleep(0.05)
            self.should_exit = True

    return DrainingServer(config)
