"""Linear-algebra helpers shared by the Hessian-based methods (SparseGPT, Hessian-cluster).

``damped_cholesky`` is the one place where a calibration Hessian H = 2 X X^T / n is made
factorisable, as in SparseGPT's reference code: dead inputs (H_jj == 0) get H_jj = 1, then
percdamp * mean(diag H) is added to the diagonal; if the Cholesky factorisation (or what the
caller derives from it) fails, the dampening is multiplied by 10, up to ``retries`` times.
Defaults: percdamp 0.01, 4 retries (up to 10^4 x the first dampening).

``torch.cholesky_inverse`` takes ~11 s for a 1536x1536 matrix on the CPU builds used here, while a
triangular solve gives the same inverse in ~0.2 s, so H^-1 is formed from L^-1 (H = L L^T,
H^-1 = L^-T L^-1). Tight loops of tiny tensor ops run single-threaded: with OpenMP on a busy
2-core machine each small op otherwise costs milliseconds of thread synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from strataprune.contract.errors import PluginError

#: dampening added to diag(H), as a fraction of mean(diag H) (SparseGPT's percdamp)
PERCDAMP = 0.01
#: how many times a failed factorisation is retried, each with 10x the previous dampening
DAMP_RETRIES = 4

T = TypeVar("T")


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


@dataclass
class Damped(Generic[T]):
    """What ``damped_cholesky`` found: the caller's result, the dead inputs and the dampening used."""

    result: T
    dead: torch.Tensor  # bool (d,): inputs with H_jj == 0 (their weights never see data)
    percdamp: float  # the fraction that worked
    failed: list[float] = field(default_factory=list)  # fractions tried before it, in order

    @property
    def retries(self) -> int:
        return len(self.failed)


def _fmt(x: float) -> str:
    return f"{x:g}"


def damped_cholesky(
    hessian: torch.Tensor,
    percdamp: float = PERCDAMP,
    retries: int = DAMP_RETRIES,
    *,
    then: Callable[[torch.Tensor], T | None] = lambda lower: lower,  # type: ignore[assignment,return-value]
    who: str = "matrix",
) -> Damped[T]:
    """Factorise H + damp I (lower Cholesky factor L) with SparseGPT's dead-input rule and dampening.

    ``then(L)`` turns the factor into what the caller needs (e.g. the upper factor of H^-1) and may
    return None or raise ``torch.linalg.LinAlgError`` to ask for more dampening. ``hessian`` is not
    modified; one fp32 working copy is made and dampened in place. Raises PluginError naming
    ``who`` when H has non-finite entries or every dampening fails.
    """
    h = hessian.detach().to(torch.float32).clone()
    if not bool(torch.isfinite(h).all()):
        raise PluginError(f"the Hessian of {who} has non-finite entries; cannot factorise it")
    diag = h.diagonal()
    dead = diag == 0
    if bool(dead.any()):
        diag[dead] = 1.0
    # |.| only matters for a broken, non-PSD H, where a negative mean would dampen the wrong way
    mean_diag = float(diag.abs().mean())
    failed: list[float] = []
    applied = 0.0
    fraction = float(percdamp)
    for attempt in range(retries + 1):
        if attempt:
            fraction *= 10.0
        diag.add_(fraction * mean_diag - applied)
        applied = fraction * mean_diag
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0 and bool(torch.isfinite(lower).all()):
            try:
                result = then(lower)
            except torch.linalg.LinAlgError:
                result = None
            if result is not None:
                return Damped(result, dead, fraction, failed)
        failed.append(fraction)
    raise PluginError(
        f"cholesky of the Hessian of {who} failed at every dampening tried "
        f"(percdamp={', '.join(_fmt(f) for f in failed)}); raise percdamp or damp_retries"
    )


def damping_note(damped: Damped) -> list[str]:
    """The report line of a factorisation that needed more dampening than asked (none otherwise)."""
    if not damped.failed:
        return []
    return [f"cholesky failed at percdamp={', '.join(_fmt(f) for f in damped.failed)}, succeeded at {_fmt(damped.percdamp)}"]


def finite_positive(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all()) and bool((x > 0).all())


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


__all__ = [
    "DAMP_RETRIES",
    "PERCDAMP",
    "Damped",
    "cholesky_inverse",
    "damped_cholesky",
    "damping_note",
    "finite_positive",
    "inverse_diagonal",
    "inverse_lower_cholesky",
    "single_thread",
]
