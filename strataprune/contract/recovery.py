"""The recovery contract: fine-tuning after pruning that keeps every pruned weight at zero."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

from strataprune.contract.adapter import ModelAdapter
from strataprune.contract.base import Plugin
from strataprune.contract.layout import ModelLayout
from strataprune.contract.sparsity import Target

if TYPE_CHECKING:  # torch loads with the first model or tensor, not with recipes and argument checks
    import torch


# --------------------------------------------------------------------------- recoveries
@dataclass
class RecoveryContext:
    """What a recovery gets from the host: the live model and callbacks into the run's machinery.

    The callbacks let a recovery drive pruning itself (LoSA prunes every round):

    - ``allocate(ratio, allocator=None)``: a checked Allocation at this global ratio, computed on the
      model *as it is now*, by the named allocator (default parameters) or, with None, by the run's own.
    - ``prune(allocation, observe=None, samples=0)``: prune the current weights with the run's pruner,
      block-sequentially. Masks are honoured: a weight that is zero now stays zero (the pruner's mask is
      intersected with the current nonzeros). With ``observe``, ``observe(block, outputs)`` receives the
      outputs of every block right after it was pruned, on the first ``samples`` calibration windows.
      Returns the realised sparsity of every matrix.
    - ``block_outputs(samples)``: the outputs of every block of the current model on the first
      ``samples`` calibration windows (a recovery's dense reference, taken before it prunes).
    - ``perplexity(desc)``: held-out perplexity of the current model on the run's evaluation windows.
    - ``training_windows(source, split, count, seqlen, seed)``: ``[count, seqlen]`` token windows of a
      dataset name or text file; the host refuses text that is the evaluation text.

    ``dense_weights``: the dense (out, in) weight of every prunable matrix, by matrix name: the copy the run
    keeps from before pruning (shared, read-only: no extra memory), e.g. a teacher for distillation.
    None where the host keeps none.
    """

    model: torch.nn.Module
    tokenizer: Any
    adapter: ModelAdapter
    layout: ModelLayout
    modules: dict[str, torch.nn.Module]  # prunable modules by matrix name, in block order
    target: Target
    pruner: str
    allocator: str
    allocation: Any  # the Allocation the run pruned with (the model's current mask when starts_from is "pruned")
    allocate: Callable[..., Any]
    prune: Callable[..., dict[str, float]]
    block_outputs: Callable[[int], list[torch.Tensor]]
    perplexity: Callable[..., float]
    training_windows: Callable[..., torch.Tensor]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dense_weights: Mapping[str, torch.Tensor] | None = None
    seed: int = 0
    progress: bool = True
    log: Callable[[str], None] = print
    notes: list[str] = field(default_factory=list)  # lines the recovery wants in the report


@dataclass
class RecoveryResult:
    """What a recovery hands back; the host verifies the model (see ``Recovery``)."""

    #: the allocation the final model realises; None = the run's allocation (a recovery that does not re-prune)
    allocation: Any = None
    #: one entry per round: target, ranks, realised sparsity, perplexities, loss ... (JSON-serialisable)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    #: every optimizer step in order: {"round": r, "step": s, "loss": x, "lr": y}
    history: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Recovery(Plugin):
    """Recovers accuracy after pruning by training, and leaves a plain sparse model behind.

    ``starts_from``: "pruned" gets the model as the run pruned it (e.g. plain LoRA); "dense" gets the
    dense model back (the run still prunes it once first, the before-recovery baseline) and prunes it
    itself through ``ctx.prune`` (e.g. LoSA's rounds). Whatever it trains, ``recover`` must leave the
    model with exactly its original parameters (adapters merged and removed). The host then checks:
    the same parameter names and shapes, no parametrization left, every matrix's realised sparsity
    matches the final allocation (and its N:M pattern), and for "pruned" no pruned weight came back.
    """

    kind: ClassVar[str] = "recovery"
    starts_from: ClassVar[Literal["pruned", "dense"]] = "pruned"
    #: whether it accepts an N:M target
    supports_nm: ClassVar[bool] = True

    def uses(self) -> list[tuple[str, str]]:
        """Other plugins it will ask the host for, as (kind, name): checked before any work starts."""
        return []

    def recover(self, ctx: RecoveryContext) -> RecoveryResult:
        raise NotImplementedError
