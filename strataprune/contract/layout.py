"""What the host tells plugins about a model: its prunable matrices, blocks, statistics and the loaded model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch loads with the first model or tensor, not with recipes and argument checks
    import torch

    from strataprune.contract.adapter import ModelAdapter

#: statistics a plugin may ask the calibration engine for
#: - ``input_norms``: per prunable matrix, the L2 norm of each input column over all calibration tokens (Wanda's ||X_j||_2)
#: - ``input_means``: per prunable matrix, the mean of each input column over all calibration tokens (DSnoT's E[X_j];
#:   with ``input_norms`` and ``ntokens`` it gives the variance Var[X_j] = ||X_j||^2 / n - E[X_j]^2)
#: - ``hessian``: per prunable matrix, H = 2 X X^T / n in fp32 (SparseGPT's Hessian)
#: - ``block_inputs`` / ``block_outputs``: the hidden states entering / leaving the block, [samples, tokens, hidden]
STATISTICS = ("input_norms", "input_means", "hessian", "block_inputs", "block_outputs")
#: what a model adapter's ``task`` may be: each has its own data and evaluation
TASKS = ("causal-lm", "image-classification", "image-embedding", "multimodal")


# --------------------------------------------------------------------------- model structure
@dataclass(frozen=True)
class MatrixInfo:
    """One prunable weight matrix, always seen in (out_features, in_features) layout."""

    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj"
    block: int  # index of its sequential block
    short: str  # name inside the block, e.g. "self_attn.q_proj"
    shape: tuple[int, int]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class ModelLayout:
    """The prunable matrices of a model, grouped into sequential blocks."""

    matrices: tuple[MatrixInfo, ...]
    num_blocks: int
    #: the stack every block belongs to: one name for a single-stack model ("decoder", "vision"), or one
    #: name per block for multimodal models (e.g. ("vision",) * 12 + ("text",) * 12); see ``stack_of``
    stack: str | tuple[str, ...] = "decoder"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {m.name: m for m in self.matrices})

    def __getitem__(self, name: str) -> MatrixInfo:
        return self._by_name[name]  # type: ignore[attr-defined]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name  # type: ignore[attr-defined]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.matrices]

    def block(self, index: int) -> list[MatrixInfo]:
        return [m for m in self.matrices if m.block == index]

    def stack_of(self, block: int) -> str:
        """The stack block ``block`` (and so each of its matrices) belongs to."""
        return self.stack if isinstance(self.stack, str) else self.stack[block]

    @property
    def stacks(self) -> list[str]:
        """Stack names in block order, each once."""
        return list(dict.fromkeys(self.stack_of(b) for b in range(self.num_blocks)))

    def block_numel(self, index: int) -> int:
        return sum(m.numel for m in self.block(index))

    @property
    def numel(self) -> int:
        return sum(m.numel for m in self.matrices)


# --------------------------------------------------------------------------- statistics
@dataclass
class BlockStats:
    """What the calibration engine measured on one block (only the statistics that were asked for).

    Statistics are read-only: matrices fed the same input (q/k/v, gate/up) share ONE tensor in
    ``input_norms`` and ``hessians``, so an in-place edit would change their neighbours' too.
    """

    block: int
    matrices: list[MatrixInfo]
    weights: dict[str, torch.Tensor]  # name -> (out, in) view of the current weight
    ntokens: int = 0
    input_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    input_means: dict[str, torch.Tensor] = field(default_factory=dict)
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: torch.Tensor | None = None
    outputs: torch.Tensor | None = None

    def for_matrix(self, name: str) -> MatrixStats:
        return MatrixStats(
            info=next(m for m in self.matrices if m.name == name),
            ntokens=self.ntokens,
            input_norms=self.input_norms.get(name),
            input_means=self.input_means.get(name),
            hessian=self.hessians.get(name),
        )


@dataclass
class MatrixStats:
    """Statistics of one matrix's inputs handed to a pruner."""

    info: MatrixInfo
    ntokens: int = 0
    input_norms: torch.Tensor | None = None  # (in,) fp32: ||X_j||_2
    hessian: torch.Tensor | None = None  # (in, in) fp32: 2 X X^T / n
    input_means: torch.Tensor | None = None  # (in,) fp32: E[X_j] over the calibration tokens


# --------------------------------------------------------------------------- model adapters
@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    adapter: ModelAdapter
    source: str
    description: dict[str, Any] = field(default_factory=dict)
    #: how inputs are prepared for non-text tasks (e.g. an ``images.ImageSpec``); None for language models
    processor: Any = None


@dataclass
class BlockInputs:
    """Hidden states entering the first block, and the extra arguments each block is called with."""

    hidden: torch.Tensor  # [samples, tokens, hidden] (any [samples, ...] shape for vision stacks)
    block_kwargs: list[dict[str, Any]]  # one per block (masks differ per block on e.g. Gemma-3)
    #: multi-stack models: at block b the hidden states restart from ``restarts[b]`` instead of the previous
    #: block's output (the first text block of CLIP); a callable is called when block b is reached, so it
    #: can recompute the stack's input from the already pruned stacks before it (LLaVA's language model)
    restarts: dict[int, torch.Tensor | Callable[[], torch.Tensor]] = field(default_factory=dict)
