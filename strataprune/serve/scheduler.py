"""Continuous batching: one thread admits requests between decode steps and runs their steps together.

Each iteration of the loop:

1. drops sequences whose client went away or whose deadline passed (their KV cache is freed at once);
2. admits waiting requests while fewer than ``max_running`` sequences hold a cache;
3. runs the next prefill chunk of one admitted sequence: at most ``prefill_chunk`` tokens and at most
   ``max_batched_tokens`` minus the decode tokens of this iteration, so a long prompt is spread over
   several iterations and never stalls the sequences already generating for longer than one chunk;
4. runs ONE decode step for every sequence whose prompt is done: a single forward over the padded
   batch (:mod:`strataprune.serve.kvcache`), then samples each row with its request's generator.

Requests wait in a bounded queue (``max_queue``; when full, :class:`Overloaded` becomes HTTP 429).
Events (text deltas, the end, an error) go to each request's ``sink``, a thread-safe callback that
the HTTP side turns into a response. A failing forward fails the sequences in it, not the server.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from strataprune.serve.protocol import ApiError
from strataprune.serve.sampling import SamplingParams, sample_token

_keys = itertools.count()


class Overloaded(Exception):
    """The queue is full."""


class Draining(Exception):
    """The server is shutting down and takes no new requests."""


@dataclass
class Event:
    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    error: ApiError | None = None


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    deadline: float
    arrival: float = field(default_factory=time.monotonic)
    key: int = field(default_factory=lambda: next(_keys))
    generated: list[int] = field(default_factory=list)
    prefilled: int = 0
    joined: bool = False
    emitted: int = 0  # characters of the text already sent
    cancel_reason: str | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished: bool = False

    def __post_init__(self) -> None:
        self.generator: torch.Generator = self.params.generator()

    def usage(self) -> dict[str, int]:
        prompt, completion = len(self.prompt_ids), len(self.generated)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class SchedulerLimits:
    max_running: int = 8
    max_batched_tokens: int = 2048
    max_queue: int = 64
    prefill_chunk: int = 256


class Scheduler:
    def __init__(self, model: Any, limits: SchedulerLimits, metrics: Any, log: Callable[[str], None] | None = None) -> None:
        self.model = model
        self.runner = model.runner
        self.tokenizer = model.tokenizer
        self.limits = limits
        self.max_running = (
            min(limits.max_running, getattr(self.runner, "max_slots", limits.max_running)) if self.runner.batching else 1
        )
        self.metrics = metrics
        self.log = log or (lambda message: None)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []  # holding a cache: prefilling (not joined) or decoding (joined)
        self.condition = threading.Condition()
        self.draining = False
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="strataprune-scheduler", daemon=True)
        self.max_batch_seen = 0
        metrics.kv_bound.set(self.kv_bound_bytes())

    def kv_bound_bytes(self) -> int:
        """The most the KV caches can hold: every running slot at the full context (padding included)."""
        return self.max_running * self.model.context_length * self.model.kv_bytes_per_token

    # ------------------------------------------------------------------ called from the HTTP side
    def start(self) -> None:
        self.thread.start()

    def submit(self, sequence: Sequence) -> None:
        with self.condition:
            if self.draining or self.stopped:
                raise Draining()
            if len(self.waiting) >= self.limits.max_queue:
                raise Overloaded()
            self.waiting.append(sequence)
            self.metrics.waiting.set(len(self.waiting))
            self.condition.notify()

    def cancel(self, sequence: Sequence, reason: str) -> None:
        with self.condition:
            if not sequence.finished and sequence.cancel_reason is None:
                sequence.cancel_reason = reason
                self.condition.notify()

    def drain(self) -> None:
        with self.condition:
            self.draining = True

    def idle(self) -> bool:
        with self.condition:
            return not self.waiting and not self.active

    def stop(self, timeout: float = 10.0) -> None:
        with self.condition:
            self.stopped = True
            self.condition.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.stopped and not self.waiting and not self.active:
                    self.condition.wait(0.5)
                if self.stopped:
                    break
                self._drop_cancelled_waiting()
                while self.waiting and len(self.active) < self.max_running:
                    self.active.append(self.waiting.popleft())
                self.metrics.waiting.set(len(self.waiting))
            self._drop_cancelled_active()
            decode_tokens = sum(1 for s in self.active if s.joined)
            prefilling = next((s for s in self.active if not s.joined), None)
            if prefilling is not None:
                self._guarded([prefilling], lambda: self._prefill_chunk(prefilling, decode_tokens))
            decoding = [s for s in self.active if s.joined]  # a prompt finished just now decodes in this step too
            if decoding:
                self._guarded(decoding, lambda: self._decode_step(decoding))
            self.metrics.running.set(len(self.active))
            self.metrics.kv_bytes.set(self.runner.kv_bytes())
        for sequence in list(self.waiting) + self.active:  # stopped: nothing more will run
            self._fail(sequence, ApiError(503, "the server is shutting down", code="shutting_down", kind="server_error"))

    def _guarded(self, sequences: list[Sequence], work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as exc:  # noqa: BLE001 -- a failing forward fails its sequences, never the server
            self.log(f"model error: {type(exc).__name__}: {exc}")
            for sequence in sequences:
                self._fail(sequence, ApiError(500, f"the model failed: {type(exc).__name__}: {exc}", kind="server_error"))

    def _drop_cancelled_waiting(self) -> None:
        now = time.monotonic()
        for sequence in list(self.waiting):
            if sequence.cancel_reason or now > sequence.deadline:
                self.waiting.remove(sequence)
                self._cancelled(sequence, sequence.cancel_reason or "timeout")

    def _drop_cancelled_active(self) -> None:
        now = time.monotonic()
        for sequence in list(self.active):
            if sequence.cancel_reason or now > sequence.deadline:
                self._release(sequence)
                self._cancelled(sequence, sequence.cancel_reason or "timeout")

    def _cancelled(self, sequence: Sequence, reason: str) -> None:
        self.metrics.cancelled.labels(reason).inc()
        if reason == "timeout":
            seconds = self.deadline_seconds(sequence)
            self._fail(
                sequence, ApiError(504, f"the request ran past its timeout of {seconds:g} s", code="timeout", kind="timeout")
            )
        sequence.finished = True

    @staticmethod
    def deadline_seconds(sequence: Sequence) -> float:
        return round(sequence.deadline - sequence.arrival, 3)

    def _release(self, sequence: Sequence) -> None:
        self.runner.release(sequence.key)
        if sequence in self.active:
            self.active.remove(sequence)

    def _fail(self, sequence: Sequence, error: ApiError) -> None:
        self._release(sequence)
        if not sequence.finished:
            sequence.finished = True
            sequence.sink(Event("error", error=error))

    # ------------------------------------------------------------------ model work
    def _prefill_chunk(self, sequence: Sequence, decode_tokens: int) -> None:
        remaining = len(sequence.prompt_ids) - sequence.prefilled
        if self.runner.prefill_chunk is None:
            size = remaining
        else:
            budget = max(1, self.limits.max_batched_tokens - decode_tokens)
            size = min(remaining, self.runner.prefill_chunk, budget)
        chunk = sequence.prompt_ids[sequence.prefilled : sequence.prefilled + size]
        logits = self.runner.prefill(sequence.key, chunk)
        sequence.prefilled += size
        self.metrics.prefill_chunks.inc()
        self.metrics.prompt_tokens.inc(size)
        if sequence.prefilled < len(sequence.prompt_ids):
            return
        self.runner.join(sequence.key, len(sequence.prompt_ids))
        sequence.joined = True
        self._take(sequence, sample_token(logits, sequence.params, sequence.generator))

    def _decode_step(self, decoding: list[Sequence]) -> None:
        inputs = {s.key: s.generated[-1] for s in decoding}
        logits = self.runner.decode(inputs)
        size = len(decoding)
        self.metrics.decode_steps.inc()
        self.metrics.batch_size.observe(size)
        if size > 1:
            self.metrics.batched_steps.inc()
        self.max_batch_seen = max(self.max_batch_seen, size)
        for sequence in decoding:
            self._take(sequence, sample_token(logits[sequence.key], sequence.params, sequence.generator))

    def _take(self, sequence: Sequence, token: int) -> None:
        """Record one sampled token: send the text that is safe to send, finish the sequence if it is done."""
        now = time.monotonic()
        if sequence.first_token_at is None:
            sequence.first_token_at = now
            self.metrics.ttft.observe(now - sequence.arrival)
        sequence.last_token_at = now
        sequence.generated.append(token)
        self.metrics.generated_tokens.inc()
        params = sequence.params
        finish = None
        text_ids = sequence.generated
        if token in self.model.eos_ids and not params.ignore_eos:
            finish, text_ids = "stop", sequence.generated[:-1]
        elif len(sequence.generated) >= params.max_tokens:
            finish = "length"
        elif len(sequence.prompt_ids) + len(sequence.generated) >= self.model.context_length:
            finish = "length"
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        cut = _first_stop(text, params.stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
        safe = len(text) if finish else _safe_length(text, params.stop)
        if safe > sequence.emitted:
            sequence.sink(Event("text", text[sequence.emitted : safe]))
            sequence.emitted = safe
        if finish:
            self._finish(sequence, finish, now)

    def _finish(self, sequence: Sequence, reason: str, now: float) -> None:
        self._release(sequence)
        sequence.finished = True
        count = len(sequence.generated)
        if count > 1 and sequence.first_token_at is not None:
            self.metrics.tpot.observe((now - sequence.first_token_at) / (count - 1))
        self.metrics.e2e.observe(now - sequence.arrival)
        sequence.sink(Event("done", finish_reason=reason, usage=sequence.usage()))


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe_length(text: str, stops: list[str]) -> int:
    """How much of ``text`` can be sent: hold back a partial UTF-8 character and any tail that may start a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for size in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:size]):
                end = min(end, len(text[:end]) - size)
                break
    return end
