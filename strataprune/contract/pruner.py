"""The pruner contract: a mask (and optionally new values) for one matrix at a given ratio."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from strataprune.contract.base import Plugin
from strataprune.contract.layout import MatrixStats
from strataprune.contract.sparsity import Target

if TYPE_CHECKING:  # torch loads with the first model or tensor, not with recipes and argument checks
    import torch


# --------------------------------------------------------------------------- pruners
@dataclass
class PruneResult:
    keep: torch.Tensor  # bool, same shape as the weight: True where the weight survives
    weight: torch.Tensor | None = None  # new weights (methods that update them), zeros where pruned
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"loss": float}, {"quant_grid": ...}


class Pruner(Plugin):
    """Chooses which weights of one matrix to remove (and, optionally, updates the survivors)."""

    kind: ClassVar[str] = "pruner"
    needs: ClassVar[frozenset[str]] = frozenset()
    updates_weights: ClassVar[bool] = False
    supports_nm: ClassVar[bool] = True

    @property
    def quantizes(self) -> bool:
        """Whether ``prune`` also quantizes the kept weights (it then returns ``extra["quant"]`` grids,
        which the host checks and saves, and reports perplexity against ``unquantized()``)."""
        return False

    def unquantized(self) -> Pruner:
        """The same pruner with quantization off: the sparse-only reference of a quantized run."""
        return self

    def prune(self, weight: torch.Tensor, target: Target, stats: MatrixStats) -> PruneResult:
        raise NotImplementedError
