"""LoSA: dynamic low-rank sparse adaptation, T rounds of pruning and masked-LoRA fine-tuning.

Paper: "Dynamic Low-Rank Sparse Adaptation for Large Language Models", Weizhong Huang, Yuxin Zhang,
Xiawu Zheng, Yang Liu, Jing Lin, Yiwu Yao, Rongrong Ji. ICLR 2025, arXiv 2502.14816.
Official code: wzhuang-xmu/LoSA (``main.py``, ``lib/prune.py``, modified PEFT; docs/algorithms.md §6).

Starting from the dense model, for round t = 1..T:

1. s_t = S - S (1 - t/T)^3 (cubic schedule; 0.3416, 0.5488, 0.6552, 0.6944, 0.7 at S = 0.7, T = 5);
   mean rank r̄_t = mean_rank + rank_step (t - 1) (6, 7, 8, 9, 10 officially).
2. Layer-wise sparsity at s_t: the RMI allocation (``allocator: rmi``, §6.2) computed on the current
   (pruned + merged) model, or the run's own allocator (``allocator: run``).
3. Prune the current (merged) weights with the run's pruner, block-sequentially; masks are honoured
   (a weight pruned in an earlier round stays zero). After each block is pruned, its reconstruction
   error against the dense block outputs (taken once before round 1) on ``error_samples`` windows:

       L_l = sum_{samples, tokens, c} ((Y^d_l - Y^s_l)_{.,c} / ||Y^d_{l,.,c}||_2)^2 / d      (§6.3)

4. Ranks (§6.4): r_l = round(L_l / L_avg · r̄_t) = round(L_l / sum_k L_k · r̄_t · L), clipped to
   [min_rank, max_rank] (1, 16); then the total is brought to r̄_t · L: while it is too large, one
   pass over the blocks with r_l > min_rank in ascending-loss order takes one rank from each until
   the excess is gone; while too small, descending-loss order, blocks with r_l < max_rank.
   Every adapter of block l gets rank r_l (at most min(d_out, d_in) of its matrix; a cut is reported).
5. Masked LoRA on every prunable matrix (strataprune/plugins/recovery/masked_lora.py):
   W_eff = W + s ((B A) ⊙ 1[W != 0]), s = ``scale`` (2: the official α/r = 16/8 whatever r_l), trained
   ``steps`` AdamW steps (strataprune/plugins/recovery/finetune.py), then merged:
   W <- W + s ((B A) ⊙ M), so the round's mask is kept exactly.

After round T the weights hold exactly the final allocation's sparsity and no extra parameter.

Deviations from the official code, each a decision:

- No silent rank cap. Officially every LoRA tensor has r = 8 and the forward pass slices
  B[:, :r_l], A[:r_l, :], so any r_l > 8 is silently 8. Here each round creates adapters of exactly
  r_l (up to ``max_rank``), so an allocated rank is a real rank.
- Fresh adapters every round: the round's update is merged at its end (the official code merges before
  pruning too, then unmerges and keeps training the same tensors, whose sliced rank changes under them);
  a new optimizer per round is what the official code does as well (a new trainer each round).
- Monotone masks with an exact mean: RMI's box [s_t - δ, s_t + δ] may give a block less sparsity than
  it already has (at S = 0.7: 0.694 + 0.03 in round 4, 0.70 - 0.03 in round 5). A pruned weight cannot
  come back (officially 1[W != 0] keeps it frozen at 0 too, so the official final sparsity can exceed
  S); here such matrices are raised to their current sparsity and all others shifted down by one
  constant (water-filling) so the parameter-weighted mean stays exactly s_t. The allocation notes say
  how many matrices were raised.
- Rank totals: the official code makes one pass, so the total can stay off after clipping; here the
  passes repeat until the total is r̄_t · L exactly (always possible, since min_rank <= r̄_t <= max_rank).
- Training text: windows of BBC News train (or any text file) instead of alpaca-gpt4 instructions; no
  LoRA dropout (0.1 officially); fp32 adapters whatever the model's dtype.
- N:M targets are refused (the cubic schedule's intermediate sparsities have no pattern); use ``lora``.

    strataprune run --recovery losa --sparsity 0.7
    strataprune run --recovery losa --sparsity 0.7 --set recovery.rounds=3 --set recovery.steps=20
    strataprune run --recovery losa --allocator owl --set recovery.allocator=run --sparsity 0.6
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from strataprune.contract.allocation import MAX_RATIO, Allocation
from strataprune.contract.errors import ConfigError
from strataprune.contract.layout import ModelLayout
from strataprune.contract.recovery import Recovery, RecoveryContext, RecoveryResult
from strataprune.plugins.common.schedules import losa_schedule
from strataprune.plugins.recovery import masked_lora as lora
from strataprune.plugins.recovery.finetune import TrainingConfig, finetune, windows_needed

_WHERE = "recovery 'losa'"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class LoSAConfig(TrainingConfig):
    #: T, the number of prune + fine-tune rounds
    rounds: int = 5
    #: layer-wise sparsity of each round: an allocator name (default RMI) or "run" for the run's own
    allocator: str = "rmi"
    #: mean LoRA rank of round 1; round t uses mean_rank + rank_step * (t - 1)
    mean_rank: int = 6
    rank_step: int = 1
    min_rank: int = 1
    max_rank: int = 16
    #: s in W + s ((B A) ⊙ M)
    scale: float = 2.0
    #: calibration windows on which the block reconstruction errors are measured
    error_samples: int = 8
    #: held-out perplexity after each round on the first N evaluation windows (0: none, null: all)
    round_eval_windows: int | None = 8

    _plugin = "losa"

    def __post_init__(self) -> None:
        super().__post_init__()

        def need(ok: bool, key: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{_WHERE}: {key}={getattr(self, key)!r} is invalid; allowed: {allowed}")

        need(_is_int(self.rounds) and self.rounds >= 1, "rounds", "an integer >= 1 (the paper uses 5)")
        need(isinstance(self.allocator, str) and bool(self.allocator), "allocator", "an allocator name (rmi) or 'run'")
        need(_is_int(self.min_rank) and self.min_rank >= 1, "min_rank", "an integer >= 1")
        need(_is_int(self.max_rank) and self.max_rank >= self.min_rank, "max_rank", f"an integer >= min_rank ({self.min_rank})")
        need(_is_int(self.rank_step) and self.rank_step >= 0, "rank_step", "an integer >= 0")
        need(
            _is_int(self.mean_rank) and self.min_rank <= self.mean_rank <= self.max_rank,
            "mean_rank",
            f"an integer in [min_rank, max_rank] = [{self.min_rank}, {self.max_rank}]",
        )
        last = self.mean_rank + self.rank_step * (self.rounds - 1)
        if _is_int(last) and last > self.max_rank:
            raise ConfigError(
                f"{_WHERE}: the last round's mean rank {self.mean_rank} + {self.rank_step} x {self.rounds - 1} = {last} "
                f"exceeds max_rank={self.max_rank}; lower mean_rank/rank_step or raise max_rank"
            )
        need(
            isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0, "scale", "a finite number > 0"
        )
        need(_is_int(self.error_samples) and self.error_samples >= 1, "error_samples", "an integer >= 1")
        need(
            self.round_eval_windows is None or (_is_int(self.round_eval_windows) and self.round_eval_windows >= 0),
            "round_eval_windows",
            "null (all), 0 (none) or a number of windows",
        )

    def mean_ranks(self) -> list[int]:
        return [self.mean_rank + self.rank_step * t for t in range(self.rounds)]


# --------------------------------------------------------------------------- pure math
def reconstruction_error(dense: torch.Tensor, sparse: torch.Tensor) -> float:
    """L = sum ((Y^d - Y^s)_{.,c} / ||Y^d_{.,c}||_2)^2 / d over samples, tokens and channels (§6.3)."""
    d = dense.reshape(-1, dense.shape[-1]).double()
    s = sparse.reshape(-1, sparse.shape[-1]).to(d.device).double()
    norms = d.norm(dim=0)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))  # a dead channel contributes its raw error
    return float((((d - s) / norms) ** 2).sum() / d.shape[-1])


def allocate_ranks(losses: Sequence[float], mean_rank: int, min_rank: int = 1, max_rank: int = 16) -> list[int]:
    """Sparsity-aware ranks (§6.4): proportional to the block losses, clipped, total = mean_rank · L.

    Rounding is half up. Each correction pass moves every eligible block by one, in ascending-loss
    order when removing ranks and descending-loss order when adding, stopping as soon as the total is
    right; passes repeat until it is (ties in loss keep block order).
    """
    x = np.asarray(losses, dtype=np.float64)
    blocks = x.size
    want = int(mean_rank) * blocks
    if blocks == 0:
        return []
    total_loss = float(x.sum())
    share = x / total_loss if math.isfinite(total_loss) and total_loss > 0 else np.full(blocks, 1.0 / blocks)
    ranks = np.clip(np.floor(share * want + 0.5), min_rank, max_rank).astype(np.int64)
    ascending = np.argsort(x, kind="stable")
    descending = np.argsort(-x, kind="stable")
    excess = int(ranks.sum()) - want
    while excess:
        order = ascending if excess > 0 else descending
        movable = order[ranks[order] > min_rank] if excess > 0 else order[ranks[order] < max_rank]
        if movable.size == 0:
            break  # only when mean_rank lies outside [min_rank, max_rank]
        chosen = movable[: abs(excess)]
        ranks[chosen] -= int(np.sign(excess))
        excess = int(ranks.sum()) - want
    return [int(r) for r in ranks]


def raise_to_floor(allocation: Allocation, floor: Mapping[str, float], layout: ModelLayout) -> tuple[Allocation, int]:
    """Ratios never below the current sparsity, parameter-weighted mean unchanged.

    Finds c with sum_m w_m clip(r_m + c, f_m, MAX_RATIO) = target · sum_m w_m by bisection (the left
    side is continuous and non-decreasing in c); matrices already at or above their floor keep their
    order. Returns the new allocation and how many matrices sit on their floor because of it.
    """
    names = layout.names
    ratios = np.array([allocation.ratios[n] for n in names])
    lo = np.minimum(np.array([float(floor.get(n, 0.0)) for n in names]), MAX_RATIO)
    if bool((ratios >= lo).all()):
        return allocation, 0
    weights = np.array([layout[n].numel for n in names], dtype=np.float64)
    target = float((ratios * weights).sum() / weights.sum())

    def mean_at(c: float) -> float:
        return float((weights * np.clip(ratios + c, lo, MAX_RATIO)).sum() / weights.sum())

    a, b = -1.0 - float(ratios.max()), 1.0
    if mean_at(a) > target:  # the floors alone exceed the target: keep them, the mean cannot be met
        b = a
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mean_at(mid) < target:
            a = mid
        else:
            b = mid
    new = np.clip(ratios + 0.5 * (a + b), lo, MAX_RATIO)
    raised = int(((ratios < lo) & np.isclose(new, lo, rtol=0, atol=1e-12)).sum())
    meta = dict(allocation.meta)
    meta["raised_to_current_sparsity"] = raised
    if abs(mean_at(0.5 * (a + b)) - target) > 1e-9:
        meta["mean_not_exact"] = True
    out = Allocation({n: float(r) for n, r in zip(names, new)}, allocation.target, allocation.allocator, meta=meta)
    return out, raised


# --------------------------------------------------------------------------- plugin
class LoSA(Recovery):
    name = "losa"
    version = "1"
    summary = "LoSA: rounds of RMI pruning and sparsity-aware masked LoRA, merged exactly (Huang et al. 2025)"
    Config = LoSAConfig
    reads = ("data",)  # a text file path, or a dataset name (not on disk: skipped)
    starts_from = "dense"
    supports_nm = False

    def uses(self) -> list[tuple[str, str]]:
        return [] if self.config.allocator == "run" else [("allocator", self.config.allocator)]

    def recover(self, ctx: RecoveryContext) -> RecoveryResult:
        cfg: LoSAConfig = self.config
        layout = ctx.layout
        allocator = None if cfg.allocator == "run" else cfg.allocator
        schedule = losa_schedule(ctx.target.ratio, cfg.rounds)
        reference = ctx.block_outputs(cfg.error_samples)  # dense outputs of every block, taken once
        current = {name: _zero_fraction(ctx.adapter.get_weight(module)) for name, module in ctx.modules.items()}
        rounds: list[dict[str, Any]] = []
        history: list[dict[str, Any]] = []
        notes: list[str] = []
        allocation: Allocation | None = None
        for t, (s_t, mean_rank) in enumerate(zip(schedule, cfg.mean_ranks())):
            start = time.perf_counter()
            label = f"round {t + 1}/{cfg.rounds}"
            ctx.log(f"losa: {label}: sparsity {s_t:.4f}, mean rank {mean_rank}")
            allocation, raised = raise_to_floor(ctx.allocate(s_t, allocator), current, layout)
            if raised:
                notes.append(
                    f"{label}: {raised} matrices raised to their current sparsity (a pruned weight never comes back); "
                    "the others shifted so the mean stays exactly at the round's target"
                )
            errors: dict[int, float] = {}

            def observe(block: int, outputs: torch.Tensor) -> None:
                errors[block] = reconstruction_error(reference[block], outputs)

            current = ctx.prune(allocation, observe=observe, samples=cfg.error_samples)
            block_losses = [errors[b] for b in range(layout.num_blocks)]
            block_ranks = allocate_ranks(block_losses, mean_rank, cfg.min_rank, cfg.max_rank)
            ranks = {m.name: min(block_ranks[m.block], *m.shape) for m in layout.matrices}
            cut = [m.name for m in layout.matrices if ranks[m.name] < block_ranks[m.block]]
            if cut:
                notes.append(f"{label}: rank cut to min(d_out, d_in) for {len(cut)} matrices (e.g. {cut[0]}: {ranks[cut[0]]})")
            ppl_pruned = self._round_perplexity(ctx, f"{label} pruned")
            windows = ctx.training_windows(cfg.data, cfg.split, windows_needed(cfg), cfg.seqlen, cfg.seed + 1 + t)
            with lora.masked_lora(ctx.modules, ranks, cfg.scale, seed=cfg.seed + t) as adapters:
                trainable = lora.parameter_count(adapters)
                steps = finetune(
                    ctx.model, lora.parameters(adapters), windows, cfg, desc=f"losa {label}", show=ctx.progress, round_index=t + 1
                )
            history.extend(steps)
            ppl_trained = self._round_perplexity(ctx, f"{label} fine-tuned")
            realised = _weighted(current, layout)
            rounds.append(
                {
                    "round": t + 1,
                    "target": s_t,
                    "realised": realised,
                    "block_sparsity": allocation.block_profile(layout),
                    "raised_matrices": raised,
                    "mean_rank": mean_rank,
                    "block_ranks": block_ranks,
                    "rank_sum": int(sum(block_ranks)),
                    "block_losses": block_losses,
                    "trainable_parameters": trainable,
                    "steps": len(steps),
                    "loss_first": steps[0]["loss"] if steps else None,
                    "loss_last": steps[-1]["loss"] if steps else None,
                    "perplexity_pruned": ppl_pruned,
                    "perplexity_trained": ppl_trained,
                    "perplexity_windows": cfg.round_eval_windows,
                    "seconds": time.perf_counter() - start,
                }
            )
            ctx.log(
                f"losa: {label}: realised {realised:.4f}, ranks {min(block_ranks)}..{max(block_ranks)} (sum {sum(block_ranks)}), "
                + (f"perplexity {ppl_pruned:.2f} pruned -> {ppl_trained:.2f} fine-tuned" if ppl_trained is not None else "")
            )
        assert allocation is not None
        allocation.meta.setdefault("notes", []).append(
            f"losa: final round of {cfg.rounds} ({cfg.allocator if allocator else 'the run allocator'} at the target)"
        )
        return RecoveryResult(
            allocation=allocation,
            rounds=rounds,
            history=history,
            notes=notes,
            extra={"schedule": schedule, "mean_ranks": cfg.mean_ranks()},
        )

    def _round_perplexity(self, ctx: RecoveryContext, desc: str) -> float | None:
        windows = self.config.round_eval_windows
        if windows == 0:
            return None
        return ctx.perplexity(desc, windows)


def _zero_fraction(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


def _weighted(ratios: Mapping[str, float], layout: ModelLayout) -> float:
    return sum(ratios[m.name] * m.numel for m in layout.matrices) / layout.numel
