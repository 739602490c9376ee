"""The model adapter contract: where a model's blocks and prunable matrices are, and how to run them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from strataprune.contract.base import Plugin
from strataprune.contract.layout import BlockInputs, LoadedModel, ModelLayout

if TYPE_CHECKING:  # torch loads with the first model or tensor, not with recipes and argument checks
    import torch


class ModelAdapter(Plugin):
    """Knows one family of model structures: sequential blocks and their prunable matrices.

    The host never reaches into a model itself: it asks the adapter for the blocks (run in order by
    the calibration engine), the prunable matrices (always seen as (out, in), whatever the storage,
    e.g. GPT-2's Conv1D), the inputs of block 0 and how to run one block. ``task`` tells the host
    which evaluation applies: "causal-lm" (token windows in, perplexity), "image-classification"
    (pixel batches in, accuracy), "multimodal" (several stacks, one after another, each matrix's
    stack named in ``ModelLayout.stack``/its block numbering). ``capture`` receives what the task's
    data gives: token ids [samples, tokens] for language models, pixel values for vision.
    """

    kind: ClassVar[str] = "adapter"
    task: ClassVar[str] = "causal-lm"
    #: models this adapter loads by name (no config.json), e.g. {"efficientnet-lite0": "pip install ..."}
    embedded: ClassVar[dict[str, str]] = {}

    def matches(self, config: Any) -> bool:
        raise NotImplementedError

    def load(self, path: str, *, dtype: torch.dtype, device: torch.device, **kwargs: Any) -> LoadedModel:
        raise NotImplementedError

    def load_empty(self, path: str, *, dtype: torch.dtype) -> LoadedModel:
        """The model built from its config on the meta device, no weights read, with its tokenizer
        (``model.offload`` then reads each block from the checkpoint when needed). Adapters that
        cannot do this leave it unimplemented and offloading is refused for their models."""
        raise NotImplementedError

    def bos_per_window(self, model: torch.nn.Module) -> bool:
        """Whether every evaluation window must start with BOS (Gemma: ppl 41 without, 17 with)."""
        return False

    def blocks(self, model: torch.nn.Module) -> Sequence[torch.nn.Module]:
        raise NotImplementedError

    def prunable(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """Full module name -> module, for every prunable matrix, in block order."""
        raise NotImplementedError

    def layout(self, model: torch.nn.Module) -> ModelLayout:
        raise NotImplementedError

    def as_matrix(self, module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """A tensor stored like ``module.weight``, seen as (out, in) (e.g. GPT-2's Conv1D stores (in, out))."""
        return weight

    def get_weight(self, module: torch.nn.Module) -> torch.Tensor:
        return self.as_matrix(module, module.weight.data)

    def set_weight(self, module: torch.nn.Module, weight: torch.Tensor) -> None:
        module.weight.data.copy_(weight)

    def capture(self, model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int = 1) -> BlockInputs:
        raise NotImplementedError

    def run_block(self, block: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    # -- optional, with defaults that fit language models (vision adapters override them) --
    def matrix_inputs(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One prunable module's input as rows [tokens, in_features] matching ``get_weight``'s columns.

        The calibration engine computes ``input_norms`` and ``hessian`` from these rows. Default: the
        last dimension is the feature (Linear); a convolution returns its unfolded (im2col) patches.
        """
        return x.reshape(-1, x.shape[-1])

    def unavailable_statistics(self, model: torch.nn.Module) -> dict[str, str]:
        """Statistics (``STATISTICS``) this model cannot provide, each with the reason; checked before any work."""
        return {}

    def encode(self, loaded: LoadedModel, batch: Any) -> Any:
        """Model inputs for a batch of the task's data (``capture`` and ``predict`` take them)."""
        raise NotImplementedError(f"adapter '{self.name}' has no task data encoder")

    def predict(self, loaded: LoadedModel, inputs: Any) -> dict[str, torch.Tensor]:
        """The outputs the task's evaluation compares (see the class docstring)."""
        raise NotImplementedError(f"adapter '{self.name}' has no task predictions")

    def save(self, loaded: LoadedModel, folder: Path) -> None:
        """Write the (pruned) model so that ``load`` reads it back."""
        loaded.model.save_pretrained(folder)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(folder)
