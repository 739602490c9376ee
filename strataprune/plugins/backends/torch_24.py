"""PyTorch 2:4 backend: ``torch.sparse.to_sparse_semi_structured`` Linears on CUDA (fp16).

    strataprune run --pruner wanda --sparsity 2:4 --output r24 && strataprune bench r24 --backends torch-2:4

Every prunable Linear whose weight follows the 2:4 pattern (at most 2 nonzeros in each group of 4
consecutive input weights of a row) gets its weight replaced by a semi-structured sparse tensor,
which runs on the sparse tensor cores of NVIDIA GPUs with compute capability >= 8.0 (cuSPARSELt or
CUTLASS kernels). The pattern is checked first on every matrix; the first one that breaks it is
named in the error. Embeddings and ``lm_head`` stay dense. Parity is against PyTorch eager on the
same GPU in the same dtype (fp16), speed against the dense models on every engine in the run.

Without CUDA (``to_sparse_semi_structured`` fails on CPU with "Only CUDA tensors are currently
supported") ``available()`` says why; the pattern check itself runs anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from strataprune.contract.backend import BackendAvailability
from strataprune.contract.errors import DataError
from strataprune.plugins.backends.torch_base import TorchBase

#: the shapes semi-structured kernels accept: rows and columns multiples of these (fp16/bf16)
MIN_ROWS, MIN_COLS = 32, 64


@dataclass
class SemiStructuredConfig:
    device: str = "cuda"
    dtype: Literal["float16", "bfloat16"] = "float16"
    compile: bool = False


def first_2to4_violation(weight: torch.Tensor) -> tuple[int, int, int] | None:
    """(row, group start column, nonzeros) of the first group of 4 with more than 2 nonzeros, or None."""
    rows, cols = weight.shape
    if cols % 4:
        return (0, cols - cols % 4, -1)
    counts = (weight.detach().reshape(rows, cols // 4, 4) != 0).sum(-1)
    bad = (counts > 2).nonzero()
    if bad.numel() == 0:
        return None
    r, g = (int(v) for v in bad[0])
    return r, 4 * g, int(counts[r, g])


def check_2to4(linears: dict[str, torch.nn.Module]) -> None:
    """Raise DataError naming the first matrix (in order) that is not 2:4 sparse."""
    for name, module in linears.items():
        weight = module.weight
        found = first_2to4_violation(weight)
        if found is None:
            continue
        row, col, count = found
        if count < 0:
            raise DataError(
                f"'{name}' ({tuple(weight.shape)}) cannot be 2:4: its {weight.shape[1]} input columns are not a multiple of 4"
            )
        raise DataError(
            f"'{name}' ({tuple(weight.shape)}) is not 2:4 sparse: row {row}, columns {col}-{col + 3} hold {count} nonzeros "
            "(at most 2 of every 4 allowed); prune with --sparsity 2:4"
        )


class TorchSemiStructured(TorchBase):
    name = "torch-2:4"
    version = "2"
    summary = "PyTorch to_sparse_semi_structured Linears on CUDA (2:4 sparse tensor cores)"
    Config = SemiStructuredConfig
    devices = ("cuda",)
    sparse_formats = ("2:4",)
    parity_tolerance = 2e-2  # fp16 accumulation order differs between sparse and dense kernels

    def available(self) -> BackendAvailability:
        version = torch.__version__
        if not hasattr(torch.sparse, "to_sparse_semi_structured"):
            return BackendAvailability(False, "this torch has no torch.sparse.to_sparse_semi_structured", version)
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
            return BackendAvailability(
                False,
                f"needs a CUDA GPU with compute capability >= 8.0 ({why}); to_sparse_semi_structured supports only CUDA tensors",
                version,
            )
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return BackendAvailability(
                False, f"needs compute capability >= 8.0 for 2:4 sparse tensor cores; this GPU has {major}.{minor}", version
            )
        return BackendAvailability(True, "", version)

    def convert(self, model: torch.nn.Module, model_dir: Path) -> torch.nn.Module:
        from torch.sparse import to_sparse_semi_structured

        from strataprune.contract.registry import get_registry

        adapters = [i.cls() for i in get_registry().find("adapter", lambda cls: True)]
        adapter = next((a for a in adapters if a.matches(model.config)), None)
        if adapter is None:
            raise DataError(f"no model adapter knows model_type '{model.config.model_type}'")
        linears = {name: m for name, m in adapter.prunable(model).items() if isinstance(m, torch.nn.Linear)}
        check_2to4(linears)
        for name, module in linears.items():
            rows, cols = module.weight.shape
            if rows % MIN_ROWS or cols % MIN_COLS:
                raise DataError(
                    f"'{name}' ({rows}x{cols}): semi-structured kernels need rows % {MIN_ROWS} == 0 and columns % {MIN_COLS} == 0"
                )
            module.weight = torch.nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
        return model
