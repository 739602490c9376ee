"""Fine-tuning loop of the recoveries: next-token cross-entropy, AdamW, linear warm-up then linear decay.

    loss = CE(model(x)[:, :-1], x[:, 1:])      (transformers' causal-LM loss with labels = input ids)
    AdamW(lr, betas (0.9, 0.999), weight_decay) on the adapter parameters only
    lr(k) = lr · (k+1)/w for k < w (w = ceil(warmup_ratio · steps)), then lr · (steps-k)/(steps-w)
    gradient norm clipped to max_grad_norm (none when null)

LoSA's official settings (docs/algorithms.md §6.1): lr 2e-4, weight decay 0.001, warm-up ratio 0.3, linear
schedule, max_grad_norm 0.3, one epoch per round of 1000 instruction rows. Here every optimizer step
draws ``batch`` fresh windows of ``seqlen`` tokens (seeded random offsets in the training text), so a
round is ``steps`` steps. The default lr is 2e-3, ten times the official value, which is set for 7B
models and ~125 steps per round; on SmolLM2-135M a few dozen steps need more (docs/recovery.md). The progress
bar shows the running loss; every step's loss and learning rate is returned. A non-finite loss stops training
with an error naming the step (lower recovery.lr).

    losses = finetune(model, params, windows, TrainingConfig(steps=40), desc="round 1")

Hooks let a recovery change the objective and constrain the update without a loop of its own
(masked full fine-tuning, strataprune/plugins/recovery/masked_ft.py): ``loss(model, ids)`` replaces the
cross-entropy, ``on_gradients()`` runs after backward and before clipping (e.g. zero the gradients of
pruned weights, so the clipped norm is that of the update actually applied), ``on_step()`` after every
optimizer step (e.g. re-apply the mask).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from strataprune.contract.errors import ConfigError, PluginError
from strataprune.contract.progress import progress_bar


def _check(where: str, ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {key}={value!r} is invalid; allowed: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: bounds that keep a typo from asking for more windows than memory holds (the windows are drawn up front)
MAX_STEPS = 1_000_000
MAX_BATCH = 4096
MAX_SEQLEN = 131_072
#: 2^27 tokens: 1 GiB of int64 token ids
MAX_TRAINING_TOKENS = 1 << 27


@dataclass
class TrainingConfig:
    """Fine-tuning settings shared by the recoveries (recipe keys under ``recovery:``)."""

    #: optimizer steps (per round for LoSA)
    steps: int = 40
    #: windows per optimizer step
    batch: int = 2
    #: tokens per training window
    seqlen: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.001
    warmup_ratio: float = 0.3
    #: gradient-norm clipping; null = none
    max_grad_norm: float | None = 0.3
    #: training text: a dataset name or a text file; never the evaluation text
    data: str = "bbc"
    split: str = "train"
    #: seeds the training windows and the adapter initialisation
    seed: int = 0

    def __post_init__(self) -> None:
        where = f"recovery '{getattr(self, '_plugin', 'recovery')}'"
        _check(
            where,
            _is_int(self.steps) and 0 <= self.steps <= MAX_STEPS,
            "steps",
            self.steps,
            f"an integer from 0 to {MAX_STEPS:,}",
        )
        _check(
            where,
            _is_int(self.batch) and 1 <= self.batch <= MAX_BATCH,
            "batch",
            self.batch,
            f"an integer from 1 to {MAX_BATCH:,}",
        )
        _check(
            where,
            _is_int(self.seqlen) and 2 <= self.seqlen <= MAX_SEQLEN,
            "seqlen",
            self.seqlen,
            f"an integer from 2 to {MAX_SEQLEN:,}",
        )
        tokens = self.steps * self.batch * self.seqlen
        if tokens > MAX_TRAINING_TOKENS:
            raise ConfigError(
                f"{where}: steps x batch x seqlen = {self.steps} x {self.batch} x {self.seqlen} = {tokens:,} training tokens "
                f"is too many; allowed: at most {MAX_TRAINING_TOKENS:,} (the windows are drawn before training)"
            )
        _check(where, math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "a finite number > 0 (e.g. 2e-3)")
        _check(
            where, math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0"
        )
        _check(where, 0.0 <= self.warmup_ratio <= 1.0, "warmup_ratio", self.warmup_ratio, "a number in [0, 1]")
        _check(
            where,
            self.max_grad_norm is None or (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0),
            "max_grad_norm",
            self.max_grad_norm,
            "null or a number > 0",
        )
        _check(
            where, isinstance(self.data, str) and bool(self.data), "data", self.data, "a dataset name (bbc) or a text file path"
        )
        _check(where, isinstance(self.split, str) and bool(self.split), "split", self.split, "a split name (train)")
        _check(where, _is_int(self.seed), "seed", self.seed, "an integer")


def lr_factor(step: int, steps: int, warmup_ratio: float) -> float:
    """Linear warm-up over ceil(warmup_ratio · steps) steps, then linear decay; never exactly 0."""
    warmup = math.ceil(warmup_ratio * steps)
    if step < warmup:
        return (step + 1) / warmup
    return (steps - step) / max(1, steps - warmup)


def finetune(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    windows: torch.Tensor,
    config: TrainingConfig,
    *,
    desc: str = "fine-tune",
    show: bool = True,
    round_index: int = 0,
    loss: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
    on_gradients: Callable[[], None] | None = None,
    on_step: Callable[[], None] | None = None,
) -> list[dict[str, float]]:
    """``config.steps`` AdamW steps on ``params``; windows[k*batch:(k+1)*batch] feed step k.

    Returns one record per step: {"round", "step", "loss", "lr"}. The model is put in train mode for
    the loop and back in eval mode afterwards; every other parameter stays frozen. ``loss``,
    ``on_gradients``, ``on_step``: the hooks of the module docstring (default: causal-LM cross-entropy, nothing).
    """
    steps, batch = config.steps, config.batch
    if windows.shape[0] < steps * batch:
        raise PluginError(f"{desc}: {windows.shape[0]} training windows for {steps} steps of {batch}")
    if steps == 0 or not params:
        return []
    device = params[0].device
    trained = {id(p) for p in params}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in trained]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, steps, config.warmup_ratio))
    history: list[dict[str, float]] = []
    model.train()
    bar = progress_bar(steps, desc=desc, unit="step", enable=show)
    try:
        with torch.enable_grad():
            for step in range(steps):
                ids = windows[step * batch : (step + 1) * batch].to(device)
                lr = optimizer.param_groups[0]["lr"]
                objective = loss(model, ids) if loss is not None else model(input_ids=ids, labels=ids, use_cache=False).loss
                value = float(objective.detach())
                if not math.isfinite(value):
                    raise PluginError(
                        f"{desc}: the training loss is {value} at step {step + 1}; nothing is saved: "
                        f"lower recovery.lr (now {config.lr:g})"
                    )
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                if on_gradients is not None:
                    on_gradients()
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                if on_step is not None:
                    on_step()
                scheduler.step()
                history.append({"round": round_index, "step": step + 1, "loss": value, "lr": lr})
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}")
    finally:
        bar.close()
        model.eval()
        optimizer.zero_grad(set_to_none=True)
        for p in frozen:
            p.requires_grad_(True)
    return history


def windows_needed(config: TrainingConfig) -> int:
    return config.steps * config.batch
