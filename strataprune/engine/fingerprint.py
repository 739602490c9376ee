"""One content fingerprint of a model's prunable weights, the key of caches that depend on them.

    fingerprint = weights_fingerprint(pipeline.weights())      # [(MatrixInfo or name, tensor), ...]

SHA-256 over every matrix in order (its name, dtype, shape and the SHA-256 of all of its bytes), so any change of
any weight (an edited checkpoint, another dtype, a renamed module) gives another key, whether the
model is in memory or offloaded (the offloaded dense weights are read from the checkpoint one
matrix at a time). The host computes it at most once per run, and only when an allocator asks
(``AllocationContext.fingerprint()``; AlphaPruning keys its spectra cache on it). Cost: one pass
over the weights at the hash's speed (SmolLM2-135M, 106 M prunable fp32 weights: see
benchmarks/results/calibration-*.md).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

#: hex digits kept (64 bits are plenty for a cache key; the full digest is computed)
LENGTH = 16


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (CPU, contiguous), without a copy when it already is both."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _digest(tensor: torch.Tensor) -> bytes:
    return hashlib.sha256(tensor_bytes(tensor)).digest()


def weights_fingerprint(weights: Iterable[tuple[Any, torch.Tensor]], workers: int | None = None) -> str:
    """SHA-256 over the names, dtypes, shapes and full contents of ``weights``, in order (hex, LENGTH digits).

    Each matrix is hashed on its own (hashlib releases the GIL, so ``workers`` threads, default
    torch's thread count, hash side by side; at most 2 x workers matrices are held at once, which
    matters when they are read from disk), then the per-matrix digests are hashed in order.
    """
    workers = max(1, workers or torch.get_num_threads())
    outer = hashlib.sha256()
    pending: deque[tuple[str, Future[bytes]]] = deque()

    def drain(keep: int) -> None:
        while len(pending) > keep:
            header, future = pending.popleft()
            outer.update(header.encode())
            outer.update(future.result())

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for key, tensor in weights:
            name = getattr(key, "name", key)
            pending.append((f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|", pool.submit(_digest, tensor)))
            drain(2 * workers)
        drain(0)
    return outer.hexdigest()[:LENGTH]
