"""Where a leaderboard's tasks run: in this process, in a pool of local processes, or on Ray.

    strataprune leaderboard grid.yaml                       # local: one task after another, here
    strataprune leaderboard grid.yaml --jobs 2              # process: concurrent.futures pool of 2 workers
    strataprune leaderboard grid.yaml --executor ray --jobs 8 --ray-address auto

All three expose the same two calls to the driver: ``submit(fn, task)`` and ``next_done()`` (the
next finished task, in completion order). Scheduling is theirs (``ProcessPoolExecutor``, Ray);
the driver only keeps at most ``jobs`` tasks in flight. Each worker gets ``threads`` torch threads
(by default its share of the machine: cores // jobs). Worker processes are started with "spawn"
(a forked copy of a process that already ran torch's thread pools can deadlock). Workers die with the
driver: on Linux each asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), even a
``kill -9``'d one; an interrupted driver (Ctrl-C, SIGTERM, strataprune/runtime/signals.py) terminates them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from strataprune.contract.errors import ConfigError, StrataPruneError

EXECUTORS = ("local", "process", "ray")


def default_threads(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


class LocalExecutor:
    """Tasks run one by one in this process when the driver asks for the next result."""

    name = "local"

    def __init__(self, jobs: int = 1, threads: int = 0) -> None:
        self.jobs = 1
        self.threads = threads
        self._queue: deque[tuple[Any, Callable[[Any], Any], Any]] = deque()

    def submit(self, handle: Any, fn: Callable[[Any], Any], task: Any) -> None:
        self._queue.append((handle, fn, task))

    @property
    def in_flight(self) -> int:
        return len(self._queue)

    def next_done(self) -> tuple[Any, Any]:
        handle, fn, task = self._queue.popleft()
        return handle, fn(task)

    def close(self) -> None:
        self._queue.clear()


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux), so a killed driver leaves no
    orphans holding a model in memory; exit now if the parent is already gone."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the request above took effect
        os._exit(1)


def _init_worker(threads: int, parent: int) -> None:
    die_with_parent(parent)
    import torch

    os.environ["STRATAPRUNE_PROGRESS"] = "0"  # several workers' bars would garble the terminal
    torch.set_num_threads(threads)


def _warm_up() -> None:
    import strataprune.leaderboard.worker  # noqa: F401 - torch, transformers and the plugins' base classes


class ProcessExecutor:
    """A ``concurrent.futures.ProcessPoolExecutor`` of ``jobs`` spawned workers."""

    name = "process"

    def __init__(self, jobs: int, threads: int) -> None:
        import multiprocessing

        self.jobs, self.threads = jobs, threads
        self.pool = ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(threads, os.getpid()),
        )
        self._futures: dict[Future, Any] = {}
        # the pool starts workers on demand, one per submit that finds none idle: ask for all of them at once,
        # so every worker pays its imports now, in parallel, instead of one worker taking every task meanwhile
        for _ in range(jobs):
            self.pool.submit(_warm_up)

    def submit(self, handle: Any, fn: Callable[[Any], Any], task: Any) -> None:
        self._futures[self.pool.submit(fn, task)] = handle

    @property
    def in_flight(self) -> int:
        return len(self._futures)

    def next_done(self) -> tuple[Any, Any]:
        from concurrent.futures.process import BrokenProcessPool

        done: set[Future] = set()
        while not done:  # short waits keep the main thread able to take a Ctrl-C / SIGINT
            done, _ = wait(self._futures, timeout=0.5, return_when=FIRST_COMPLETED)
        future = next(iter(done))
        handle = self._futures.pop(future)
        try:
            return handle, future.result()
        except BrokenProcessPool:
            raise StrataPruneError(
                "a worker process died (killed, or out of memory); finished cells are saved: run the same command to continue"
                " (fewer --jobs use less memory)"
            ) from None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """Ray tasks (each asks for ``threads`` CPUs); connects to ``address`` or starts a local Ray instance."""

    name = "ray"

    def __init__(self, jobs: int, threads: int, address: str | None = None) -> None:
        from strataprune.runtime.ray_cluster import connect_ray, import_ray

        self.ray = import_ray("--executor ray")
        self.jobs, self.threads = jobs, threads
        runtime_env = {"env_vars": {"STRATAPRUNE_PROGRESS": "0"}}
        self._started = connect_ray(address, init_options={"runtime_env": runtime_env}) != "already"
        self._remote: dict[Callable[[Any], Any], Any] = {}
        self._refs: dict[Any, Any] = {}

    def submit(self, handle: Any, fn: Callable[[Any], Any], task: Any) -> None:
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(num_cpus=self.threads, max_retries=0)(fn)
        self._refs[self._remote[fn].remote(task)] = handle

    @property
    def in_flight(self) -> int:
        return len(self._refs)

    def next_done(self) -> tuple[Any, Any]:
        done, _ = self.ray.wait(list(self._refs), num_returns=1)
        ref = done[0]
        handle = self._refs.pop(ref)
        try:
            return handle, self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # the worker died; the task's own errors come back as records
            return handle, {"status": "failed", "error": f"Ray task failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"}

    def close(self) -> None:
        for ref in list(self._refs):
            self.ray.cancel(ref, force=True)
        self._refs.clear()
        if self._started:
            self.ray.shutdown()


def make_executor(kind: str, jobs: int, threads: int | None, address: str | None = None) -> Any:
    if kind not in EXECUTORS:
        raise ConfigError(f"--executor {kind!r} is not one of: {', '.join(EXECUTORS)}")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs} must be at least 1")
    threads = threads or default_threads(jobs)
    if kind == "ray":
        return RayExecutor(jobs, threads, address)
    if kind == "process" or jobs > 1:
        return ProcessExecutor(jobs, threads)
    return LocalExecutor(1, threads)
