"""Quantization grids of jointly pruned-and-quantized weights: the host's check and the saved record.

A pruner that quantizes (SparseGPT with ``wbits``) returns, per matrix, ``extra["quant"]`` =
``{"bits", "groupsize", "sym", "scale", "zero"}`` with ``scale``/``zero`` of shape
``(d_out, n_groups)``; input column j of row r uses group ``j // groupsize`` (one group per row
when ``groupsize`` is None). A kept weight w lies on the grid when

    q = round(w / scale + zero) is an integer in [0, 2^bits - 1] and w == scale * (q - zero).

Pruned weights are exact zeros (0 is always on the min-max grid, so they are on it too).
The saved model stores the dequantized values (zeros kept); the grid goes next to it as
``quantization.safetensors`` (``<matrix>.scale`` / ``<matrix>.zero``, fp32) and
``quantization.json`` (bits, group size, formula, the host's check), so the integer codes can be
recovered exactly: ``q = round(w / scale + zero)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from strataprune.contract.errors import PluginError

FORMULA = "w = scale[r, j // groupsize] * (q - zero[r, j // groupsize]), q integer in [0, 2^bits - 1]"


def expand(grid: torch.Tensor, cols: int, groupsize: int | None) -> torch.Tensor:
    """(rows, n_groups) -> (rows, cols): the grid value that applies to each weight."""
    if groupsize is None:
        return grid[:, :1].expand(-1, cols)
    return grid.repeat_interleave(groupsize, dim=1)[:, :cols]


def grid_error(weight: torch.Tensor, quant: dict[str, Any]) -> float:
    """Largest distance of any weight from its grid, in grid steps (0 = every value on the grid).

    Codes outside [0, 2^bits - 1] count as their distance to the nearest allowed code.
    """
    w = weight.detach().float()
    cols = w.shape[1]
    scale = expand(quant["scale"].float().to(w.device), cols, quant["groupsize"])
    zero = expand(quant["zero"].float().to(w.device), cols, quant["groupsize"])
    code = w / scale + zero
    nearest = torch.clamp(torch.round(code), 0, 2 ** int(quant["bits"]) - 1)
    return float((code - nearest).abs().max()) if w.numel() else 0.0


def tolerance(dtype: torch.dtype, bits: int) -> float:
    """Allowed grid error for weights stored in ``dtype``: rounding to bf16/fp16 moves values off the
    fp32 grid by up to eps * |q - zero| steps; fp32 only by float noise."""
    if dtype == torch.float32:
        return 1e-3
    return float(torch.finfo(dtype).eps) * 2**bits + 1e-3


def check_grid(weight: torch.Tensor, quant: dict[str, Any], who: str) -> float:
    """Raise PluginError when ``weight`` is off its recorded grid; return the grid error."""
    for key in ("bits", "groupsize", "sym", "scale", "zero"):
        if key not in quant:
            raise PluginError(f"{who}: quantization record lacks '{key}'")
    rows, cols = weight.shape
    groups = 1 if quant["groupsize"] is None else -(-cols // int(quant["groupsize"]))
    for key in ("scale", "zero"):
        if tuple(quant[key].shape) != (rows, groups):
            raise PluginError(f"{who}: quantization {key} has shape {tuple(quant[key].shape)}, expected {(rows, groups)}")
    if not bool((quant["scale"] > 0).all()):
        raise PluginError(f"{who}: quantization scales must be > 0")
    err = grid_error(weight, quant)
    allowed = tolerance(weight.dtype, int(quant["bits"]))
    if not err <= allowed:
        raise PluginError(
            f"{who}: quantized weights lie up to {err:.3g} grid steps off the recorded grid (allowed {allowed:.3g})"
        )
    return err


def save_grids(folder: Path, grids: dict[str, dict[str, Any]], summary: dict[str, Any]) -> None:
    """Write ``quantization.safetensors`` (per-matrix scale/zero) and ``quantization.json``."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, quant in grids.items():
        tensors[f"{name}.scale"] = quant["scale"].detach().float().cpu().contiguous()
        tensors[f"{name}.zero"] = quant["zero"].detach().float().cpu().contiguous()
    save_file(tensors, str(folder / "quantization.safetensors"))
    (folder / "quantization.json").write_text(json.dumps({**summary, "tensors": "quantization.safetensors"}, indent=2))


def load_grids(folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Read back what ``save_grids`` wrote: (summary, name -> quant record)."""
    from safetensors.torch import load_file

    summary = json.loads((Path(folder) / "quantization.json").read_text())
    tensors = load_file(str(Path(folder) / "quantization.safetensors"))
    grids = {}
    for key in tensors:
        if key.endswith(".scale"):
            name = key[: -len(".scale")]
            grids[name] = {
                "bits": summary["bits"],
                "groupsize": summary["groupsize"],
                "sym": summary["sym"],
                "scale": tensors[key],
                "zero": tensors[f"{name}.zero"],
            }
    return summary, grids
