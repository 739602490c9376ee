"""Masked full fine-tuning after pruning, optionally distilled from the dense model (``masked-ft``).

Every kept weight of every prunable matrix trains; a pruned weight stays exactly zero. With M = 1[W ≠ 0]
taken once from the pruned model, each step is

    g = ∇_W L ⊙ M                       (the gradient of a pruned entry is zeroed before clipping)
    W ← AdamW(W, g)                     (finetune.py: linear warm-up, linear decay, gradient clipping)
    W ← W ⊙ M                           (the mask re-applied after the step)

With g = 0 at a pruned entry its AdamW moments stay 0 and its update is 0, and decoupled weight decay
scales 0 to 0; re-applying the mask makes the zeros exact whatever the optimizer does. After training
the zeros are checked to be exactly M's, so the run's allocation, realised sparsity and N:M pattern are
unchanged (the host checks them again). Nothing is added to the model.

The loss is next-token cross-entropy, or with ``distill`` (the default) knowledge distillation from the
dense model (Hinton et al., arXiv 1503.02531), as used to recover pruned LLMs by Kurtic et al.
("Sparse Fine-tuning for Inference Acceleration of Large Language Models", arXiv 2310.06927):

    L = T² · mean over tokens of KL(softmax(z_dense / T) || softmax(z_sparse / T)) + ce_weight · CE

over every position of every window. The teacher is the same model run with the dense weights the
run kept from before pruning (``RecoveryContext.dense_weights``) substituted for its prunable weights
(``torch.func.functional_call``): no second model is built. What training adds to memory, for P trained
weights: their gradients and AdamW's two moments (12 bytes per weight in float32), the masks (1 byte per
weight), the teacher's logits (batch · seqlen · vocabulary · 4 bytes) and, when norms or embeddings train, a
dense copy of those for the teacher. On SmolLM2-135M (P = 106M) that is about 1.4 GB on top of the run.

    strataprune run --sparsity 0.7 --recovery masked-ft                  # 200 steps of 2 x 256 BBC train tokens
    strataprune run --sparsity 2:4 --recovery masked-ft --set recovery.steps=300 --set recovery.lr=2e-4
    strataprune run --recovery masked-ft --set recovery.distill=false      # plain cross-entropy
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from strataprune.contract.errors import ConfigError, PluginError
from strataprune.contract.recovery import Recovery, RecoveryContext, RecoveryResult
from strataprune.plugins.recovery.finetune import TrainingConfig, finetune, windows_needed

_WHERE = "recovery 'masked-ft'"


@dataclass
class MaskedFTConfig(TrainingConfig):
    #: optimizer steps in total
    steps: int = 200
    #: windows per optimizer step
    batch: int = 2
    #: tokens per training window
    seqlen: int = 256
    #: peak learning rate; full fine-tuning wants 10x less than LoRA's 2e-3
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    #: distil from the dense model (KL at ``temperature``); false = cross-entropy only
    distill: bool = True
    #: T of the distillation loss
    temperature: float = 1.0
    #: weight of the cross-entropy added to the distillation loss (ignored without distill: the loss is CE)
    ce_weight: float = 0.0
    #: also train the normalisation weights (dense; off by default)
    train_norms: bool = False
    #: also train the token embeddings and the output head (dense; off by default)
    train_embeddings: bool = False

    _plugin = "masked-ft"

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("distill", "train_norms", "train_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise ConfigError(f"{_WHERE}: {key}={value!r} is invalid; allowed: true or false")
        for key, allowed, ok in (
            # bounded so that T² and the weighted sum stay ordinary floats (1e200 overflowed, 1e-30 trained nothing)
            ("temperature", "a number from 0.1 to 100 (e.g. 1.0)", lambda v: 0.1 <= v <= 100),
            ("ce_weight", "a number from 0 to 1000 (0: distillation only)", lambda v: 0 <= v <= 1000),
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ConfigError(f"{_WHERE}: {key}={value!r} is invalid; allowed: {allowed}")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · mean over positions of KL(softmax(teacher / T) || softmax(student / T)); logits [..., vocabulary]."""
    vocabulary = student.shape[-1]
    log_q = F.log_softmax(student.float().reshape(-1, vocabulary) / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float().reshape(-1, vocabulary) / temperature, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * temperature**2


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits at positions 0..n-2 against tokens 1..n-1."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class MaskKeeper:
    """The pruned positions of every trained matrix (stored layout) and the two operations that keep them zero."""

    def __init__(self, weights: dict[str, torch.nn.Parameter]) -> None:
        self.weights = weights
        self.pruned = {name: w.detach() == 0 for name, w in weights.items()}

    def zero_gradients(self) -> None:
        for name, weight in self.weights.items():
            if weight.grad is not None:
                weight.grad.masked_fill_(self.pruned[name], 0.0)

    @torch.no_grad()
    def apply(self) -> None:
        for name, weight in self.weights.items():
            weight.masked_fill_(self.pruned[name], 0.0)

    @torch.no_grad()
    def check(self) -> None:
        """The zeros are exactly the pruned positions: none revived, and no kept weight became zero."""
        for name, weight in self.weights.items():
            zeros = weight == 0
            if not torch.equal(zeros, self.pruned[name]):
                revived = int((self.pruned[name] & ~zeros).sum())
                lost = int((zeros & ~self.pruned[name]).sum())
                raise PluginError(
                    f"{_WHERE}: {name} changed its mask ({revived} pruned weights revived, {lost} kept weights at 0)"
                )


def trained_parameters(
    ctx: RecoveryContext, train_norms: bool, train_embeddings: bool
) -> tuple[dict[str, torch.nn.Parameter], dict[str, torch.nn.Parameter]]:
    """(prunable weights by full parameter name, the other trained parameters by name), each tensor once."""
    model = ctx.model
    path_of = {id(module): path for path, module in model.named_modules()}
    matrices: dict[str, torch.nn.Parameter] = {}
    for name, module in ctx.modules.items():
        if id(module) not in path_of:
            raise PluginError(f"{_WHERE}: prunable matrix {name} is not a module of the model")
        key = f"{path_of[id(module)]}.weight" if path_of[id(module)] else "weight"
        if key in matrices:  # two matrices of one module would pair the teacher's weights wrongly
            raise PluginError(f"{_WHERE}: prunable matrix {name} shares its module's weight {key} with another matrix")
        matrices[key] = module.weight
    seen = {id(p) for p in matrices.values()}
    extra: dict[str, torch.nn.Parameter] = {}
    wanted: set[int] = set()
    if train_embeddings:
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is not None and getattr(layer, "weight", None) is not None:
                wanted.add(id(layer.weight))
    if train_norms:
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                wanted.update(id(p) for p in module.parameters(recurse=False))
    for name, param in model.named_parameters():  # named_parameters lists a tied tensor once
        if id(param) in wanted and id(param) not in seen:
            extra[name] = param
            seen.add(id(param))
    return matrices, extra


class MaskedFT(Recovery):
    name = "masked-ft"
    version = "1"
    summary = "full fine-tuning of the kept weights (mask kept exactly), distilled from the dense model"
    Config = MaskedFTConfig
    reads = ("data",)  # a text file path, or a dataset name (not on disk: skipped)
    starts_from = "pruned"

    def recover(self, ctx: RecoveryContext) -> RecoveryResult:
        cfg: MaskedFTConfig = self.config
        start = time.perf_counter()
        matrices, extra = trained_parameters(ctx, cfg.train_norms, cfg.train_embeddings)
        keeper = MaskKeeper(matrices)
        loss = None
        if cfg.distill:
            if ctx.dense_weights is None:
                raise PluginError(
                    f"{_WHERE}: distill needs the run's dense weights, which this host does not give; set distill=false"
                )
            # the teacher: the same model with the dense weights of the prunable matrices (and, when they
            # train, a copy of the norms/embeddings as they are now, i.e. dense) substituted for the forward pass
            teacher: dict[str, torch.Tensor] = {}
            # trained_parameters adds one entry per prunable matrix, in ctx.modules' order, and refuses shared ones
            for (param_name, weight), (matrix, module) in zip(matrices.items(), ctx.modules.items(), strict=True):
                dense = ctx.adapter.as_matrix(module, ctx.dense_weights[matrix])  # (out, in) -> stored layout
                if dense.shape != weight.shape:
                    raise PluginError(
                        f"{_WHERE}: the dense weight of {matrix} is {tuple(dense.shape)}, the model's {tuple(weight.shape)}"
                    )
                teacher[param_name] = dense.to(weight.device, weight.dtype)
            teacher.update({name: p.detach().clone() for name, p in extra.items()})

            def loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
                training = model.training
                model.eval()  # the teacher is the dense model as it predicts: no dropout (GPT-2, OPT have it)
                try:
                    with torch.no_grad():
                        target = torch.func.functional_call(model, teacher, (), {"input_ids": ids, "use_cache": False}).logits
                finally:
                    model.train(training)
                logits = model(input_ids=ids, use_cache=False).logits
                value = distillation_loss(logits, target, cfg.temperature)
                if cfg.ce_weight:
                    value = value + cfg.ce_weight * next_token_loss(logits, ids)
                return value

        params = list(matrices.values()) + list(extra.values())
        trainable = sum(int((~keeper.pruned[n]).sum()) for n in matrices) + sum(p.numel() for p in extra.values())
        windows = ctx.training_windows(cfg.data, cfg.split, windows_needed(cfg), cfg.seqlen, cfg.seed + 1)
        history = finetune(
            ctx.model,
            params,
            windows,
            cfg,
            desc="masked-ft" + (" (distill)" if cfg.distill else ""),
            show=ctx.progress,
            round_index=1,
            loss=loss,
            on_gradients=keeper.zero_gradients,
            on_step=keeper.apply,
        )
        keeper.check()
        summary: dict[str, Any] = {
            "round": 1,
            "target": ctx.target.ratio,
            "objective": (
                f"T^2 KL(dense || sparse), T={cfg.temperature:g}" + (f" + {cfg.ce_weight:g} CE" if cfg.ce_weight else "")
            )
            if cfg.distill
            else "cross-entropy",
            "trainable_parameters": trainable,
            "trained_tensors": len(params),
            "steps": len(history),
            "tokens": len(history) * cfg.batch * cfg.seqlen,
            "loss_first": history[0]["loss"] if history else None,
            "loss_last": history[-1]["loss"] if history else None,
            "seconds": time.perf_counter() - start,
        }
        return RecoveryResult(allocation=None, rounds=[summary], history=history)
