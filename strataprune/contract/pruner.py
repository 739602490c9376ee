"""The pruner contract: a mask (and optionally new values) for one matrix at a given ratio."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from strataprune.contract.base import Plugin
from strataprune.contract.layout import MatrixInfo, MatrixStats
from strataprune.contract.sparsity import BlockShape, NMPattern, Target

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

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        if not self.block_shape.unit:  # whole blocks and n-of-m groups cannot both hold
            self.supports_nm = False  # type: ignore[misc]

    @property
    def quantizes(self) -> bool:
        """Whether ``prune`` also quantizes the kept weights (it then returns ``extra["quant"]`` grids,
        which the host checks and saves, and reports perplexity against ``unquantized()``)."""
        return False

    def unquantized(self) -> Pruner:
        """The same pruner with quantization off: the sparse-only reference of a quantized run."""
        return self

    @property
    def block_shape(self) -> BlockShape:
        """The tiles this pruner keeps or removes whole (the host checks every mask against it); 1x1 = unstructured."""
        return BlockShape()

    def nm_refusal(self, pattern: NMPattern) -> str:
        """The one-line error for an N:M target this pruner (as configured) does not support."""
        message = f"pruner '{self.name}' does not support N:M sparsity ({pattern})"
        if not self.block_shape.unit:
            message += (
                f": block={self.block_shape} keeps or removes whole {self.block_shape} blocks, which no N:M pattern can "
                "follow; use a ratio target (e.g. --sparsity 0.7) or block 1x1"
            )
        return message

    def check_matrices(self, matrices: Iterable[MatrixInfo]) -> None:
        """Refuse (ConfigError), once the model is loaded and before any calibration, matrices this pruner cannot prune."""
        if not self.block_shape.unit:
            for info in matrices:
                self.block_shape.check_shape(info.shape, info.name)

    def prune(self, weight: torch.Tensor, target: Target, stats: MatrixStats) -> PruneResult:
        raise NotImplementedError
