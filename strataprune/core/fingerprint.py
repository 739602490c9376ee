"""One content fingerprint of a model's prunable weights, the key of caches that depend on them.

    fingerprint = weights_fingerprint(pipeline.weights())      # [(MatrixInfo or name, tensor), ...]

SHA-256 over every matrix in order: its name, dtype, shape and all of its bytes, so any change of
any weight (an edited checkpoint, another dtype, a renamed module) gives another key, whether the
model is in memory or offloaded (the offloaded dense weights are read from the checkpoint one
matrix at a time). The host computes it at most once per run, and only when an allocator asks
(``AllocationContext.fingerprint()``; AlphaPruning keys its spectra cache on it). Cost: one pass
over the weights at the hash's speed (SmolLM2-135M, 106 M prunable fp32 weights: see
benchmarks/results/calibration-*.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch

#: hex digits kept (64 bits are plenty for a cache key; the full digest is computed)
LENGTH = 16


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (CPU, contiguous), without a copy when it already is both."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def weights_fingerprint(weights: Iterable[tuple[Any, torch.Tensor]]) -> str:
    """SHA-256 of the names, dtypes, shapes and full contents of ``weights``, in order (hex, LENGTH digits)."""
    digest = hashlib.sha256()
    for key, tensor in weights:
        name = getattr(key, "name", key)
        digest.update(f"{name}|{str(tensor.dtype)}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()[:LENGTH]
