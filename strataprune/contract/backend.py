"""The inference backend contract (version ``BACKEND_CONTRACT``): prepare, generate, parity, timing."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from strataprune.contract.base import Plugin

# --------------------------------------------------------------------------- backends
#: the version of the Backend contract below; a backend states the one it was written for in ``contract``
#: (1: available/prepare only; 2: generation with a KV cache, timing, parity tolerance, settings)
BACKEND_CONTRACT = 2


@dataclass
class BackendAvailability:
    ok: bool
    reason: str = ""  # why not, and how to get it (e.g. "needs CUDA" or "pip install 'strataprune[deploy]'")
    version: str = ""  # the engine's version, when it can be found (also when it cannot run)


@dataclass
class DeploySettings:
    """What ``prepare`` may fix at compile time: fixed-shape engines compile for exactly these shapes."""

    batch: int = 1
    prompt_len: int = 128
    new_tokens: int = 32  # tokens generated after the prompt (decode steps)
    threads: int | None = None  # compute threads of the engine; None = the engine's default

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.new_tokens


class CompiledModel:
    """A causal language model ready on one engine, with a KV cache between calls.

    Token ids are int64 numpy arrays ``[batch, tokens]``; logits come back as float32 numpy
    ``[batch, tokens, vocab]``; ``state`` is whatever the engine keeps between calls (its KV cache).
    An engine implements ``prefill`` and ``decode``; ``greedy`` and the timing methods follow from
    them, and an engine that runs out of process overrides the timing methods so that the clock
    runs where the work is (no inter-process copies in the figures).
    """

    def __init__(self, backend: str, artifact: Path | None = None, meta: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.artifact = artifact  # the file the engine runs (e.g. model.onnx), None when it runs the checkpoint
        self.meta: dict[str, Any] = dict(meta or {})  # format, sizes, notes ...

    def prefill(self, input_ids: Any) -> tuple[Any, Any]:
        """Process a prompt: (logits [batch, tokens, vocab], state)."""
        raise NotImplementedError

    def decode(self, token_ids: Any, state: Any) -> tuple[Any, Any]:
        """One step of generation: ``token_ids`` [batch, 1] after ``state`` -> (logits [batch, 1, vocab], new state)."""
        raise NotImplementedError

    def greedy(self, input_ids: Any, steps: int) -> Any:
        """The ``steps`` tokens that greedy decoding appends to the prompt, [batch, steps] int64."""
        import numpy as np

        logits, state = self.prefill(input_ids)
        tokens = []
        for step in range(steps):
            token = np.asarray(logits)[:, -1, :].argmax(-1).astype(np.int64)[:, None]
            tokens.append(token)
            if step + 1 < steps:
                logits, state = self.decode(token, state)
        return np.concatenate(tokens, axis=1)

    def time_prefill(self, input_ids: Any, warmup: int, repeats: int) -> list[float]:
        """Seconds of each timed ``prefill`` of ``input_ids`` (after ``warmup`` untimed calls)."""
        import time

        times = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            self.prefill(input_ids)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        return times

    def time_decode(self, input_ids: Any, tokens: int, warmup: int, repeats: int) -> list[float]:
        """Seconds per generated token of each timed repetition: prefill ``input_ids`` (untimed), then
        ``tokens`` greedy decode steps with the KV cache (timed, divided by ``tokens``)."""
        import time

        import numpy as np

        times = []
        for i in range(warmup + repeats):
            logits, state = self.prefill(input_ids)
            start = time.perf_counter()
            for _ in range(tokens):
                token = np.asarray(logits)[:, -1, :].argmax(-1).astype(np.int64)[:, None]
                logits, state = self.decode(token, state)
            if i >= warmup:
                times.append((time.perf_counter() - start) / tokens)
        return times

    def close(self) -> None:
        """Free the engine's memory (sessions, worker processes)."""


class Backend(Plugin):
    """An inference engine that runs a pruned model, measured end to end against its dense twin.

    The contract (version ``BACKEND_CONTRACT`` = 2; a backend sets ``contract`` to the version it
    implements, and the host refuses versions it does not know):

    - ``available()``: whether the engine can run here, and if not why and how to get it, with the
      engine's version; it must not import the engine at ``import strataprune`` time (engines load
      lazily, inside these methods) and must never raise.
    - ``prepare(model_dir, workdir, settings) -> CompiledModel``: export/compile a saved causal LM
      (the output folder of ``strataprune run`` or ``strataprune deploy``; the weights may be
      dense safetensors or the sparse-bitmask format, see ``strataprune.deploy.storage``) for the
      engine, writing whatever it needs under ``workdir``; ``settings`` fixes batch, prompt
      length, generated tokens and threads.
    - ``reference_backend``: the registered name of the backend whose logits this one must reproduce
      (``parity_tolerance``: largest allowed |logit difference| / max(1, largest |reference logit|)),
      by default ``torch`` (PyTorch eager, fp32 on CPU); ``reference_params()``: that backend's
      parameters for checking this instance (default: its defaults), or None when this instance is the
      reference itself. The host builds the reference through the registry.
    - ``devices``: where it runs ("cpu", "cuda"); ``sparse_formats``: what it turns into speed
      ("unstructured", "2:4", "int4"), empty for a dense engine (the verdict says so);
      ``fixed_shapes``: prepared per prompt length (the host prepares once per length it times).
    """

    kind: ClassVar[str] = "backend"
    contract: ClassVar[int] = BACKEND_CONTRACT
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    sparse_formats: ClassVar[tuple[str, ...]] = ()
    parity_tolerance: ClassVar[float] = 1e-3
    #: the registered name of the backend this one's parity is checked against; None: no reference (it is its own)
    reference_backend: ClassVar[str | None] = "torch"
    #: True when a prepared model runs only the batch and prompt length it was prepared for
    fixed_shapes: ClassVar[bool] = False

    def available(self) -> BackendAvailability:
        return BackendAvailability(True)

    def prepare(self, model_dir: Path, workdir: Path, settings: DeploySettings) -> CompiledModel:
        raise NotImplementedError

    def reference_params(self) -> dict[str, Any] | None:
        """The parameters of ``reference_backend`` (recipe keys of its Config) that check this instance, e.g. the
        same device and dtype; None when this instance is the reference itself."""
        return {} if self.reference_backend else None

    def label(self) -> str:
        """The name shown in reports: the plugin name plus any non-default parameter."""
        defaults = self.Config() if dataclasses.is_dataclass(self.Config) else None
        changed = [f"{k}={v}" for k, v in self.params().items() if defaults is None or getattr(defaults, k, None) != v]
        return self.name + (":" + ":".join(changed) if changed else "")
