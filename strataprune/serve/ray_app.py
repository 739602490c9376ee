"""``strataprune serve DIR --ray --replicas N``: the same server as N replicas of a Ray Serve deployment.

Each replica is a Ray actor that owns one model copy, its continuous-batching scheduler and its metrics, and
answers through the very Starlette app of the single-process server (``api.create_app``, mounted with
``serve.ingress``), so the endpoints, streaming and error bodies are the same. Ray Serve's HTTP proxy listens on
``--host``/``--port`` and spreads requests over the replicas (it prefers the less loaded of two random replicas);
nothing here balances. Every answer names the replica that produced it in ``X-Strataprune-Replica`` (and
``/health`` in ``replica``). ``/metrics`` is per replica: the proxy sends each scrape to one of them.

A replica is routed requests only once its model is loaded (Ray Serve waits for the constructor), so the
proxy never answers "loading"; a model that cannot be loaded fails the deployment and the command with one
error line. SIGTERM or Ctrl-C deletes the application: Ray Serve stops routing to the replicas and lets the
requests in flight finish (up to ``--timeout`` + 10 s), then stops them; a local Ray instance this command
started is shut down, a cluster joined with ``--ray-address`` keeps running. A second signal stops at once.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from strataprune.contract.errors import ConfigError
from strataprune.runtime.ray_cluster import check_address, connect_ray, import_ray
from strataprune.serve.server import ServeSettings, bind_socket

APP_NAME = "strataprune"
DEPLOYMENT_NAME = "StrataPruneServer"
MAX_REPLICAS = 256
FEATURE = "`strataprune serve --ray`"
#: how often a replica asks whether the command is stopping (seconds)
DRAIN_POLL_SECONDS = 0.25
#: requests each replica takes beyond its running and queued sequences: /health, /metrics, /v1/models while full
SPARE_REQUESTS = 16


class ServedReplica:
    """One replica: loads the model in its constructor and serves the single-process server's app."""

    def __init__(self, folder: str, settings: ServeSettings, drain_flag: Any = None) -> None:
        from ray import serve

        from strataprune.serve.api import ServerState
        from strataprune.serve.metrics import ServeMetrics
        from strataprune.serve.model import choose_backend, inspect_folder
        from strataprune.serve.server import load_into

        context = serve.get_replica_context()
        self.state = ServerState(ServeMetrics(settings.max_running), settings.timeout, settings.max_body_bytes, settings.api_key)
        self.state.replica = f"{context.deployment}#{context.replica_id.unique_id}"
        info = inspect_folder(folder)
        backend = choose_backend(info, settings.backend)
        self.workdir = Path(tempfile.mkdtemp(prefix="strataprune-serve-"))

        def say(message: str) -> None:  # goes to the replica's log file under Ray's session folder
            print(f"[serve {self.state.replica}] {message}", file=sys.stderr, flush=True)

        load_into(self.state, info, backend, self.workdir, settings, say)
        if self.state.status == "error":
            self.close()
            raise RuntimeError(f"the model could not be loaded: {self.state.error}")
        if drain_flag is not None:
            threading.Thread(target=self._watch, args=(drain_flag, say), name="strataprune-drain-watch", daemon=True).start()

    def _watch(self, drain_flag: Any, say: Callable[[str], None]) -> None:
        """Drain like the single-process server once the command raises the flag: new requests get 503."""
        import ray

        while self.state.scheduler is not None:
            try:
                raised = ray.get(drain_flag.is_raised.remote(), timeout=10)
            except Exception:  # noqa: BLE001 -- the flag's actor is gone: the command stopped without raising it
                return
            if raised:
                break
            time.sleep(DRAIN_POLL_SECONDS)
        scheduler = self.state.scheduler
        if scheduler is None:
            return
        self.state.status = "draining"
        scheduler.drain()
        say("draining: refusing new requests, finishing those in flight")
        while not scheduler.idle():
            time.sleep(0.05)
        drain_flag.report_idle.remote(self.state.replica)

    def __serve_build_asgi_app__(self) -> Any:
        from strataprune.serve.api import create_app

        return create_app(self.state)

    def check_health(self) -> None:
        """Ray Serve's periodic health check: a replica whose scheduler thread died is replaced."""
        scheduler = self.state.scheduler
        if scheduler is not None and not scheduler.thread.is_alive():
            raise RuntimeError("the scheduler thread stopped")

    def close(self) -> None:
        if self.state.scheduler is not None:
            self.state.scheduler.stop()
            self.state.scheduler = None
        if self.state.model is not None:
            self.state.model.close()
            self.state.model = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __del__(self) -> None:  # Ray Serve calls it after the requests in flight finished
        self.close()


class DrainFlag:
    """A Ray actor the replicas poll: raised by the command on SIGTERM/Ctrl-C (Ray Serve has no broadcast to replicas)."""

    def __init__(self) -> None:
        self.raised = False
        self.idle: set[str] = set()

    def raise_flag(self) -> None:
        self.raised = True

    def is_raised(self) -> bool:
        return self.raised

    def report_idle(self, replica: str) -> None:
        self.idle.add(replica)

    def idle_replicas(self) -> int:
        return len(self.idle)


def check_ray_flags(replicas: int, replica_cpus: float) -> None:
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ConfigError(f"--replicas {replicas}; allowed: an integer in [1, {MAX_REPLICAS}]")
    if not (math.isfinite(replica_cpus) and 0 < replica_cpus <= 1024):
        raise ConfigError(f"--replica-cpus {replica_cpus:g}; allowed: a number of CPUs in (0, 1024], fractions included")


def free_port(host: str) -> int:
    sock = bind_socket(host, 0)
    port = int(sock.getsockname()[1])
    sock.close()
    return port


def serve_on_ray(
    folder: str | Path,
    settings: ServeSettings,
    replicas: int,
    replica_cpus: float = 1.0,
    address: str | None = None,
    log: Callable[[str], None] | None = None,
) -> int:
    """Serve ``folder`` as ``replicas`` Ray Serve replicas behind Ray Serve's proxy until SIGTERM/SIGINT."""
    from strataprune.serve.model import choose_backend, inspect_folder

    say = log or (lambda message: print(f"[serve] {message}", file=sys.stderr, flush=True))
    settings.check()
    check_ray_flags(replicas, replica_cpus)
    info = inspect_folder(folder)  # a bad folder or backend is refused before Ray starts
    backend = choose_backend(info, settings.backend)
    import_ray(FEATURE, extra="ray-serve")
    serve = import_ray(FEATURE, "ray.serve", extra="ray-serve")
    import ray

    if address is not None:
        check_address(address)  # before anything else: a typo gives one line at once
    if settings.port == 0:
        settings.port = free_port(settings.host)
    else:
        bind_socket(settings.host, settings.port).close()  # taken: one error line now, not a proxy that never starts
    if settings.threads is None:
        settings.threads = max(1, int(replica_cpus))

    stopping = threading.Event()
    ready = False

    def on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001 -- the signal-handler signature
        if stopping.is_set() or not ready:
            say(f"{signal.Signals(signum).name}: stopping now")
            raise KeyboardInterrupt
        say(f"{signal.Signals(signum).name}: Ray Serve stops routing to the replicas; finishing the requests in flight")
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    # a local instance gets at least the CPUs the replicas ask for, so that they start on a small machine too
    # (they then share its cores); a cluster schedules them on its own resources
    local_cpus = max(os.cpu_count() or 1, math.ceil(replicas * replica_cpus))
    ownership = "already"
    drain_flag = None
    try:
        say(f"starting Ray ({'a local instance' if address is None else address})")
        ownership = connect_ray(
            address,
            init_options={"runtime_env": {"env_vars": {"STRATAPRUNE_PROGRESS": "0"}}},
            num_cpus=local_cpus,
            object_store_memory=100 * 2**20,  # replicas read the model from disk; nothing large goes through it
        )
        for sig in previous:  # ray.init put its own crash reporter on SIGTERM, which kills the process after reporting
            signal.signal(sig, on_signal)
        serve.start(http_options={"host": settings.host, "port": settings.port}, logging_config={"log_level": "WARNING"})
        deployment = serve.deployment(
            serve.ingress()(ServedReplica),
            name=DEPLOYMENT_NAME,
            num_replicas=replicas,
            ray_actor_options={"num_cpus": replica_cpus},
            max_ongoing_requests=settings.max_running + settings.max_queue + SPARE_REQUESTS,
            graceful_shutdown_timeout_s=settings.timeout + 10,
            graceful_shutdown_wait_loop_s=0.5,
            max_constructor_retry_count=replicas,
        )
        say(f"loading {info.path} into {replicas} replica(s) of {replica_cpus:g} CPU, {settings.threads} thread(s) each")
        try:
            drain_flag = ray.remote(num_cpus=0)(DrainFlag).remote()
            serve.run(deployment.bind(str(Path(folder).resolve()), settings, drain_flag), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # a replica's constructor failed (the model could not be loaded)
            reason = " ".join(str(exc).split())
            raise ConfigError(f"the Ray Serve deployment failed: {reason[-600:]}") from None
        ready = True
        say(
            f"listening on http://{settings.host}:{settings.port} (Ray Serve, {replicas} replica(s), "
            f"backend {backend.label()}, {info.path})"
        )
        while not stopping.wait(0.5):
            pass
    except KeyboardInterrupt:
        if not stopping.is_set():
            stopping.set()
            ready = False  # no graceful deletion after a second signal or one during startup
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop(serve, ray, ownership, drain_flag if ready else None, replicas, settings.timeout + 10, say)
    say("stopped")
    return 0


def _stop(
    serve: Any, ray: Any, ownership: str, drain_flag: Any, replicas: int, drain_seconds: float, say: Callable[[str], None]
) -> None:
    """Drain the replicas (``drain_flag``, None: stop at once), delete our application, shut down what we started."""
    if not ray.is_initialized():
        return
    try:
        if drain_flag is not None:
            # the replicas answer new requests with 503 (as one server does) until all those in flight have finished;
            # only then is the application deleted (Ray Serve's proxy would answer 404 for it)
            ray.get(drain_flag.raise_flag.remote(), timeout=10)
            deadline = time.monotonic() + drain_seconds
            while ray.get(drain_flag.idle_replicas.remote(), timeout=10) < replicas and time.monotonic() < deadline:
                time.sleep(0.1)
            serve.delete(APP_NAME, _blocking=True)
        if ownership == "started":
            serve.shutdown()
        elif drain_flag is None:
            serve.delete(APP_NAME, _blocking=False)
    except Exception as exc:  # noqa: BLE001 -- a failed cleanup must still shut Ray down below
        say(f"warning: stopping Ray Serve: {type(exc).__name__}: {exc}")
    finally:
        if ownership != "already":
            ray.shutdown()
