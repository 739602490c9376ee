"""Small linear-algebra helpers shared by the Hessian-based methods (SparseGPT, Hessian-cluster).

``torch.cholesky_inverse`` takes ~11 s for a 1536x1536 matrix on the CPU builds used here, while a
triangular solve gives the same inverse in ~0.2 s, so H^-1 is formed from L^-1 (H = L L^T,
H^-1 = L^-T L^-1). Tight loops of tiny tensor ops run single-threaded: with OpenMP on a busy
2-core machine each small op otherwise costs milliseconds of thread synchronisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def inverse_lower_cholesky(lower: torch.Tensor) -> torch.Tensor:
    """L^-1 for a lower-triangular Cholesky factor L."""
    eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    return torch.linalg.solve_triangular(lower, eye, upper=False)


def cholesky_inverse(lower: torch.Tensor) -> torch.Tensor:
    """(L L^T)^-1 from its lower Cholesky factor; the same result as ``torch.cholesky_inverse``."""
    inv = inverse_lower_cholesky(lower)
    return inv.T @ inv


def inverse_diagonal(lower: torch.Tensor) -> torch.Tensor:
    """diag((L L^T)^-1) without forming the inverse: column sums of squares of L^-1."""
    return (inverse_lower_cholesky(lower) ** 2).sum(dim=0)


@contextmanager
def single_thread(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a loop of tiny CPU ops on one thread (no effect on CUDA work)."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
