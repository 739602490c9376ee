"""Masked LoRA after pruning: the plain recovery LoSA is compared against.

LoRA (Hu et al., ICLR 2022, arXiv 2106.09685) on every prunable matrix of the pruned model, with the
update multiplied by the weight's mask as in LoSA (strataprune/plugins/recovery/masked_lora.py):

    W_eff = W + s ((B A) ⊙ 1[W != 0]),   B A of one uniform rank r,   s = ``scale``

trained ``steps`` AdamW steps on the training text (strataprune/plugins/recovery/finetune.py), then merged,
W <- W + s ((B A) ⊙ M): the run's allocation, mask and N:M pattern are kept exactly and the saved
model has no extra parameters. One round; the model is pruned once by the run (its allocator and
pruner), so the difference to ``losa`` is LoSA's gradual schedule, RMI allocation and per-block ranks.

    strataprune run --recovery lora --sparsity 0.7
    strataprune run --recovery lora --sparsity 2:4 --set recovery.rank=16 --set recovery.steps=100
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from strataprune.contract.errors import ConfigError
from strataprune.contract.recovery import Recovery, RecoveryContext, RecoveryResult
from strataprune.plugins.recovery import masked_lora as lora
from strataprune.plugins.recovery.finetune import TrainingConfig, finetune, windows_needed

_WHERE = "recovery 'lora'"


@dataclass
class LoRAConfig(TrainingConfig):
    #: optimizer steps in total (LoSA's default is 5 rounds x 40)
    steps: int = 200
    #: rank of every adapter (at most min(d_out, d_in) of its matrix; a cut is reported)
    rank: int = 8
    #: s in W + s ((B A) ⊙ M)
    scale: float = 2.0

    _plugin = "lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"{_WHERE}: rank={self.rank!r} is invalid; allowed: an integer >= 1")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"{_WHERE}: scale={self.scale!r} is invalid; allowed: a finite number > 0")


class LoRA(Recovery):
    name = "lora"
    version = "1"
    summary = "masked LoRA of one rank after pruning, merged exactly (the comparison for losa)"
    Config = LoRAConfig
    reads = ("data",)  # a text file path, or a dataset name (not on disk: skipped)
    starts_from = "pruned"

    def recover(self, ctx: RecoveryContext) -> RecoveryResult:
        cfg: LoRAConfig = self.config
        start = time.perf_counter()
        ranks = {m.name: min(cfg.rank, *m.shape) for m in ctx.layout.matrices}
        notes: list[str] = []
        cut = [name for name, r in ranks.items() if r < cfg.rank]
        if cut:
            notes.append(f"rank cut to min(d_out, d_in) for {len(cut)} matrices (e.g. {cut[0]}: {ranks[cut[0]]})")
        windows = ctx.training_windows(cfg.data, cfg.split, windows_needed(cfg), cfg.seqlen, cfg.seed + 1)
        with lora.masked_lora(ctx.modules, ranks, cfg.scale, seed=cfg.seed) as adapters:
            trainable = lora.parameter_count(adapters)
            history = finetune(ctx.model, lora.parameters(adapters), windows, cfg, desc="lora", show=ctx.progress, round_index=1)
        summary: dict[str, Any] = {
            "round": 1,
            "target": ctx.target.ratio,
            "rank": cfg.rank,
            "trainable_parameters": trainable,
            "steps": len(history),
            "loss_first": history[0]["loss"] if history else None,
            "loss_last": history[-1]["loss"] if history else None,
            "seconds": time.perf_counter() - start,
        }
        return RecoveryResult(allocation=None, rounds=[summary], history=history, notes=notes)
