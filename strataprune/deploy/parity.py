"""Parity: an engine must compute what PyTorch computes before its speed means anything.

    ref = reference_outputs(torch_model, windows, steps=8)
    result = check_parity(onnx_model, ref, tolerance=1e-3)   # raises ParityError when it does not

Two checks on real text windows ``[n, length]`` (fed ``batch`` rows at a time):

1. logits: ``max |engine - reference| / max(1, max |reference|) <= tolerance`` over every window,
   position and vocabulary entry (a relative bound: logits of real models reach 20-40);
2. greedy tokens: from each window, ``steps`` greedy tokens through the engine's KV cache (prefill,
   then decode one token at a time) must equal the reference's tokens exactly.

A failure raises one ParityError naming the engine, the tolerance and the difference found (or the
first differing step), so no benchmark runs on an engine that computes something else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from strataprune.contract.backend import Backend, CompiledModel
from strataprune.contract.errors import StrataPruneError


class ParityError(StrataPruneError):
    """An engine's outputs differ from the reference's beyond the stated tolerance."""


@dataclass
class Reference:
    windows: np.ndarray  # [n, length] int64
    logits: list[np.ndarray]  # per batch chunk, [batch, length, vocab]
    tokens: np.ndarray  # [n, steps]
    batch: int
    steps: int


def _chunks(windows: np.ndarray, batch: int) -> list[np.ndarray]:
    return [windows[i : i + batch] for i in range(0, len(windows) - batch + 1, batch)]


def reference_backend(engine: Backend) -> Backend | None:
    """The backend ``engine``'s logits are checked against, built through the registry from what the backend
    names (``reference_backend``, ``reference_params()``); None when ``engine`` is the reference itself."""
    params = engine.reference_params()
    if engine.reference_backend is None or params is None:
        return None
    from strataprune.contract.registry import get_registry

    return get_registry().create("backend", engine.reference_backend, params, where=f"the reference of backend '{engine.name}'")


def reference_outputs(model: CompiledModel, windows: Any, steps: int, batch: int = 1) -> Reference:
    windows = np.ascontiguousarray(np.asarray(windows), dtype=np.int64)
    chunks = _chunks(windows, batch)
    logits = [model.prefill(chunk)[0].astype(np.float32, copy=False) for chunk in chunks]
    tokens = np.concatenate([model.greedy(chunk, steps) for chunk in chunks]) if steps else np.zeros((len(windows), 0), np.int64)
    return Reference(windows[: len(chunks) * batch], logits, tokens, batch, steps)


def check_parity(model: CompiledModel, ref: Reference, tolerance: float, who: str | None = None) -> dict[str, Any]:
    """Compare ``model`` with the reference; returns the figures, raises ParityError on failure."""
    who = who or model.backend
    worst = 0.0
    scale = 1.0
    for chunk, expected in zip(_chunks(ref.windows, ref.batch), ref.logits):
        got = np.asarray(model.prefill(chunk)[0], dtype=np.float32)
        if got.shape != expected.shape:
            raise ParityError(f"parity failed on {who}: logits of shape {got.shape}, the reference has {expected.shape}")
        if not np.isfinite(got).all():
            raise ParityError(f"parity failed on {who}: non-finite logits (tolerance {tolerance:g})")
        worst = max(worst, float(np.abs(got - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
    relative = worst / scale
    if not relative <= tolerance:
        raise ParityError(
            f"parity failed on {who}: max |logit difference| {worst:.4g} = {relative:.3g} of the largest reference logit "
            f"({scale:.3g}), tolerance {tolerance:g}"
        )
    if ref.steps:
        tokens = np.concatenate([model.greedy(chunk, ref.steps) for chunk in _chunks(ref.windows, ref.batch)])
        if not np.array_equal(tokens, ref.tokens):
            row, step = (int(v) for v in np.argwhere(tokens != ref.tokens)[0])
            raise ParityError(
                f"parity failed on {who}: greedy token {step + 1} of {ref.steps} differs on window {row} "
                f"({int(tokens[row, step])} vs reference {int(ref.tokens[row, step])}), tolerance: identical tokens"
            )
    return {
        "max_abs_logit_diff": worst,
        "relative": relative,
        "tolerance": tolerance,
        "windows": int(len(ref.windows)),
        "length": int(ref.windows.shape[1]),
        "greedy_steps": ref.steps,
        "greedy_identical": True,
    }
