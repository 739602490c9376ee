"""Masked LoRA: low-rank adapters that can never revive a pruned weight (LoSA §6.5, docs/algorithms.md).

LoRA (Hu et al., ICLR 2022, arXiv 2106.09685) trains W_eff = W + s · B A with W frozen,
A ∈ R^{r×d_in}, B ∈ R^{d_out×r}, B = 0 at the start. LoSA (Huang et al., ICLR 2025, arXiv 2502.14816)
multiplies the update by the weight's mask, M = 1[W ≠ 0]:

    W_eff = W + s · ((B A) ⊙ M)

so W_eff is exactly zero wherever W is, whatever A and B become (the gradient of A and B only ever sees
(∂L/∂W_eff) ⊙ M, and weight decay moves A and B, not W_eff's zeros). Merging, W ← W + s · ((B A) ⊙ M),
therefore keeps the sparsity pattern exactly, and the merged model has no extra parameters.

Written from that definition (no peft). The update is a ``torch.nn.utils.parametrize`` parametrization
of the module's stored weight, so it works for any layout (``nn.Linear`` and GPT-2's transposed
``Conv1D`` alike): the low-rank product and the mask live in the storage layout. A, B are float32
whatever the model's dtype; the update is cast to the weight's dtype in the forward pass.
Initialisation as in LoRA: A ~ U(-1/√d_in, 1/√d_in) (Kaiming-uniform with a = √5), B = 0, from a
seeded generator so runs repeat.

    with masked_lora(modules, ranks={"model.layers.0.mlp.up_proj": 8, ...}, scale=2.0, seed=0) as adapters:
        ...train the parameters of ``adapters``...
    # on exit the updates are merged into the weights and the parametrizations removed
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from strataprune.contract.errors import PluginError


class MaskedLoRA(nn.Module):
    """The parametrization of one stored weight: weight ↦ weight + scale · ((B @ A) ⊙ keep)."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float, generator: torch.Generator) -> None:
        super().__init__()
        rows, cols = weight.shape
        if not 1 <= rank <= min(rows, cols):
            raise PluginError(f"LoRA rank {rank} is outside [1, {min(rows, cols)}] for a {rows}x{cols} weight")
        bound = 1.0 / math.sqrt(cols)
        a = (torch.rand(rank, cols, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        self.A = nn.Parameter(a.to(weight.device))
        self.B = nn.Parameter(torch.zeros(rows, rank, dtype=torch.float32, device=weight.device))
        self.register_buffer("keep", weight.detach() != 0, persistent=False)
        self.rank = rank
        self.scale = float(scale)
        self.weight_requires_grad = True  # restored on the weight when the adapter is removed

    def delta(self) -> torch.Tensor:
        """s · ((B A) ⊙ M) in float32; masked_fill gives exact zeros even if B A held a non-finite value."""
        return (self.B @ self.A).mul(self.scale).masked_fill(~self.keep, 0.0)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


def attach(modules: Mapping[str, nn.Module], ranks: Mapping[str, int], scale: float, seed: int = 0) -> dict[str, MaskedLoRA]:
    """Put a masked LoRA on the ``weight`` of every named module (in the mapping's order, one seeded generator)."""
    generator = torch.Generator().manual_seed(int(seed))
    adapters: dict[str, MaskedLoRA] = {}
    try:
        for name, module in modules.items():
            if parametrize.is_parametrized(module):
                raise PluginError(f"{name} already carries a parametrization; merge its adapter first")
            weight = module.weight
            lora = MaskedLoRA(weight.detach(), int(ranks[name]), scale, generator)
            lora.weight_requires_grad = weight.requires_grad
            parametrize.register_parametrization(module, "weight", lora)
            module.parametrizations.weight.original.requires_grad_(False)  # W is frozen: only A and B train
            adapters[name] = lora
    except BaseException:
        detach(modules, merge_updates=False)
        raise
    return adapters


@torch.no_grad()
def detach(modules: Mapping[str, nn.Module], merge_updates: bool = True) -> None:
    """Remove every masked LoRA; with ``merge_updates`` the update is added to the weight first."""
    for module in modules.values():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        holder = module.parametrizations.weight
        original = holder.original
        requires_grad = original.requires_grad
        for lora in holder:
            if isinstance(lora, MaskedLoRA):
                if merge_updates:
                    original.add_(lora.delta().to(original.dtype))
                requires_grad = lora.weight_requires_grad
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        module.weight.requires_grad_(requires_grad)


@contextmanager
def masked_lora(
    modules: Mapping[str, nn.Module], ranks: Mapping[str, int], scale: float, seed: int = 0
) -> Iterator[dict[str, MaskedLoRA]]:
    """Adapters for the duration of the block, merged into the weights on a normal exit.

    On an error the adapters are removed without merging, so the model is left as it was before.
    """
    adapters = attach(modules, ranks, scale, seed)
    try:
        yield adapters
    except BaseException:
        detach(modules, merge_updates=False)
        raise
    detach(modules, merge_updates=True)


def parameters(adapters: Mapping[str, MaskedLoRA]) -> list[nn.Parameter]:
    """The trainable tensors (A and B of every adapter), in a fixed order."""
    return [p for lora in adapters.values() for p in (lora.A, lora.B)]


def parameter_count(adapters: Mapping[str, MaskedLoRA]) -> int:
    return sum(p.numel() for p in parameters(adapters))
