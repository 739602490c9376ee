"""DSnoT refinement after any pruner: the base pruner's mask, improved by prune-and-grow swaps.

Paper: "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs", Zhang et al., ICLR 2024,
arXiv 2310.08915. The update rule is in strataprune/plugins/common/dsnot.py and docs/algorithms.md §2.5.

A wrapper: ``base`` names the pruner whose mask (and values, for pruners that update weights) is the
starting point, ``base_params`` its parameters. Then, per output row, a weight is revived and another
pruned while that reduces the row's expected reconstruction error, so every row (and every N:M group)
keeps exactly the count the base pruner gave it. Needs the base pruner's statistics plus each matrix's
input norms and means (the variance comes from both). A base pruner with a ``block`` other than 1x1
is refused: single-weight swaps would break its blocks.

    strataprune run --pruner dsnot --set pruner.base=wanda --sparsity 0.7
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from strataprune.contract.errors import ConfigError, PluginError
from strataprune.contract.layout import MatrixStats
from strataprune.contract.pruner import Pruner, PruneResult
from strataprune.contract.sparsity import Target
from strataprune.plugins.common.dsnot import STOP_RULES, dsnot_refine, input_variance


@dataclass
class DSnoTConfig:
    #: the pruner whose mask is refined
    base: str = "wanda"
    #: that pruner's parameters
    base_params: dict[str, Any] = field(default_factory=dict)
    #: most prune-and-grow swaps per row (the paper's maximum cycle count)
    max_cycles: int = 50
    #: exponent p of the input variance dividing the growing criterion (0: no variance term)
    variance_power: float = 1.0
    #: a row whose expected error |eps| is at most this is left alone (the paper's update threshold)
    update_threshold: float = 0.1
    #: when a row stops: "sign" (the paper's: a swap would flip the sign of eps), "improvement" (|eps| would not shrink)
    stop: Literal["sign", "improvement"] = "sign"
    #: which matrices are refined: "all", or "attention" (matrices whose name contains "attn"; the reference code's default)
    scope: Literal["all", "attention"] = "all"

    def __post_init__(self) -> None:
        if not isinstance(self.base, str) or not self.base or self.base == "dsnot":
            raise ConfigError(f"dsnot: base={self.base!r} must name another pruner (e.g. 'wanda', 'sparsegpt', 'magnitude')")
        if isinstance(self.max_cycles, bool) or not isinstance(self.max_cycles, int) or self.max_cycles < 0:
            raise ConfigError(f"dsnot: max_cycles={self.max_cycles!r} must be an integer >= 0")
        if not (0.0 <= float(self.variance_power) <= 4.0):
            raise ConfigError(f"dsnot: variance_power={self.variance_power!r} must be in [0, 4]")
        if not float(self.update_threshold) >= 0.0:
            raise ConfigError(f"dsnot: update_threshold={self.update_threshold!r} must be >= 0")
        if self.stop not in STOP_RULES:
            raise ConfigError(f"dsnot: stop={self.stop!r} must be one of {', '.join(repr(r) for r in STOP_RULES)}")
        if self.scope not in ("all", "attention"):
            raise ConfigError(f"dsnot: scope={self.scope!r} must be one of 'all', 'attention'")


class DSnoT(Pruner):
    name = "dsnot"
    version = "1"
    summary = "any pruner's mask refined by training-free prune-and-grow swaps (Zhang et al. 2024)"
    Config = DSnoTConfig
    needs = frozenset({"input_norms", "input_means"})
    updates_weights = True

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        from strataprune.contract.registry import get_registry

        cfg: DSnoTConfig = self.config
        # the base is found through the registry (a plugin never imports another plugin)
        self.base: Pruner = get_registry().create("pruner", cfg.base, cfg.base_params, where=f"dsnot's base pruner '{cfg.base}'")
        if self.base.quantizes:
            raise ConfigError(
                f"dsnot: base pruner '{cfg.base}' quantizes; grown weights would leave its grid (run it without wbits)"
            )
        if not self.base.block_shape.unit:
            raise ConfigError(
                f"dsnot: base pruner '{cfg.base}' has block={self.base.block_shape}; DSnoT swaps single weights, which "
                "would break its blocks; give the base block 1x1 (or run the blocked pruner without dsnot)"
            )
        self.needs = frozenset(self.base.needs) | DSnoT.needs  # type: ignore[misc]
        self.supports_nm = self.base.supports_nm  # type: ignore[misc]

    def prune(self, weight: torch.Tensor, target: Target, stats: MatrixStats) -> PruneResult:
        cfg: DSnoTConfig = self.config
        if stats.input_norms is None or stats.input_means is None:
            raise PluginError("dsnot needs input_norms and input_means statistics, which the calibration engine did not provide")
        result = self.base.prune(weight, target, stats)
        if cfg.scope == "attention" and "attn" not in stats.info.short:
            return result
        start = result.weight if result.weight is not None else weight * result.keep
        variances = input_variance(stats.input_norms, stats.input_means, stats.ntokens)
        group = target.pattern.m if target.pattern is not None else None
        keep, values, summary = dsnot_refine(
            weight,
            start,
            result.keep,
            stats.input_means,
            variances,
            stats.input_norms,
            max_cycles=cfg.max_cycles,
            variance_power=float(cfg.variance_power),
            update_threshold=float(cfg.update_threshold),
            stop=cfg.stop,
            group=group,
        )
        extra = {**result.extra, "dsnot": summary}
        return PruneResult(keep=keep, weight=values, notes=list(result.notes), extra=extra)
