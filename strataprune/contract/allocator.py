"""The allocator contract: per-matrix sparsity ratios at a global target."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from strataprune.contract.base import Plugin
from strataprune.contract.layout import BlockStats, MatrixInfo, ModelLayout
from strataprune.contract.sparsity import Target

if TYPE_CHECKING:  # torch loads with the first model or tensor, not with recipes and argument checks
    import torch


# --------------------------------------------------------------------------- allocators
def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")


@dataclass
class CandidateHost:
    """What the host offers an allocator that assembles candidate models from pruned weights
    (``Allocator.assembles = True``; EvoPress): no re-pruning per candidate.

    - ``prune_levels(ratios, visit)``: one calibration pass over the DENSE model with the run's pruner
      statistics; every matrix is pruned by the run's pruner at each ratio ``ratios[name]`` lists, and
      ``visit(info, level, keep, weight)`` gets the mask and, for pruners that update weights, the new
      values (None otherwise: the dense values on the mask); nothing stays installed in the model.
    - ``windows(on)``: held-out token windows [n, seqlen] ("validation": drawn from the calibration
      text with another seed, as searching allocators' selection windows are; "test": the evaluation text).
    - ``logits(ids)``: the model's next-token logits [tokens, vocab] (fp32) for one window [tokens], with
      the weights installed now.
    - ``set_weight(name, weight)``: install a matrix; ``restore()``: every matrix dense again.
    """

    prune_levels: Callable[[Mapping[str, Sequence[float]], Callable[..., None]], None]
    windows: Callable[[str], torch.Tensor]
    logits: Callable[[torch.Tensor], torch.Tensor]
    set_weight: Callable[[str, torch.Tensor], None]
    restore: Callable[[], None]
    #: whether the run's pruner changes the kept values (then ``visit`` gets them)
    updates_weights: bool = False


@dataclass
class AllocationContext:
    """Everything an allocator may use besides the statistics it observed."""

    layout: ModelLayout
    target: Target
    seed: int = 0
    pruner: str = "wanda"
    weights: Callable[[], Iterator[tuple[MatrixInfo, torch.Tensor]]] | None = None
    #: prune a copy with a candidate allocation and return held-out perplexity (lower is better);
    #: only set when the allocator declares ``searches = True``
    score: Callable[[Any], float] | None = None
    #: a cheaper ``score`` (same signature) for screening many candidates: the pruner's statistics come
    #: from one dense pass (half the calibration windows) reused by every call and a quarter of the
    #: selection windows are scored, so values are comparable with each other but not with ``score``;
    #: None when the host offers none
    screen: Callable[[Any], float] | None = None
    #: the pruned-candidate machinery; only set when the allocator declares ``assembles = True``
    candidates: CandidateHost | None = None
    device: torch.device = field(default_factory=_cpu)
    cache_dir: Path | None = None
    #: content hash of the dense prunable weights (strataprune/engine/fingerprint.py); read it through ``fingerprint()``
    model_fingerprint: str = ""
    progress: bool = True
    notes: list[str] = field(default_factory=list)  # lines the allocator wants in the report
    #: computes ``model_fingerprint`` on first use (the host sets it, so runs that need no key pay nothing)
    fingerprint_fn: Callable[[], str] | None = field(default=None, repr=False)

    def fingerprint(self) -> str:
        """The weights' content fingerprint, computed at most once ("" when the host gave none)."""
        if not self.model_fingerprint and self.fingerprint_fn is not None:
            self.model_fingerprint = self.fingerprint_fn()
        return self.model_fingerprint


class Allocator(Plugin):
    """Decides a sparsity ratio for every prunable matrix, with a global parameter-weighted target.

    ``allocate`` may return an ``Allocation``, a mapping matrix-name -> ratio, or a sequence of
    per-block ratios (expanded to every matrix of the block). The host validates it: keys are the
    prunable matrices, ratios in [0, 1), and the mean its ``mean_rule`` names (default: the
    parameter-weighted mean; "block-mean" for the papers' unweighted block mean) equal to the target
    within 1e-3, plus 1/(2m) when it sets N:M patterns. Nothing in ``meta`` relaxes this.
    """

    kind: ClassVar[str] = "allocator"
    #: statistics wanted from a calibration pass over the *dense* model (see STATISTICS)
    needs: ClassVar[frozenset[str]] = frozenset()
    #: whether ``allocate`` needs ``ctx.score`` (prune-and-evaluate trials)
    searches: ClassVar[bool] = False
    #: whether ``allocate`` needs ``ctx.candidates`` (a database of pruned weights and the model's logits)
    assembles: ClassVar[bool] = False
    #: whether it can allocate for an N:M target (checked before any work, like ``Pruner.supports_nm``)
    supports_nm: ClassVar[bool] = True

    def observe_block(self, stats: BlockStats) -> None:
        """Called once per block, in order, during the dense pass; keep only reduced statistics."""

    def allocate(self, ctx: AllocationContext) -> Any:
        raise NotImplementedError
