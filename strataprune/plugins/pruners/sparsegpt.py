"""SparseGPT: one-shot pruning with OBS weight updates (Frantar & Alistarh, ICML 2023, arXiv 2301.00774).

Inputs: the weight W (d_out x d_in) and the Hessian H = 2 X X^T / n of its calibration inputs,
accumulated in fp32 by the host during block-sequential calibration (docs/algorithms.md §1, §2.3).

1. Dead inputs (H_jj == 0): set H_jj = 1 and zero W[:, j].
2. Dampening: add percdamp * mean(diag H) to the diagonal (percdamp = 0.01).
3. U = upper Cholesky factor of H^-1 (H^-1 = U^T U); the "diagonal" d_q below is U_qq.
   If a Cholesky fails (not positive definite, or NaN), retry with percdamp * 10, up to
   ``damp_retries`` times; the result carries a note saying what happened.
4. Sweep the columns left to right in blocks of ``blocksize`` = 128 (lazy batch updates):
   - mask selection, adaptive: unstructured: at the start of each block, saliency w^2 / d^2 over
     the whole (d_out x blocksize) slab, all rows together; exactly floor(numel_slab * s) entries
     with the lowest saliency are pruned (stable sort, ties by position), so the realised count is
     known in advance. N:M (keep n of m): at every column i with i % m == 0, each row prunes its
     m - n lowest-saliency columns among i .. i+m-1. ``block`` RxC (whole tiles of R output rows by
     C input columns): the same slab, blocksize rounded down to a multiple of C; a tile's saliency
     is the sum of its members' w^2 / d^2 and the lowest tiles are pruned (ties by tile position,
     row-major), as many as the matrix's floor(tiles * s) gives this slab: floor(t2 * s) - floor(t1 * s),
     t1 and t2 the tiles left of the slab's first and past its last column, so the matrix count is
     exact. Only the mask changes: the column sweep below is the same.
   - column i: q = w with pruned entries set to 0 (and, with ``wbits``, kept entries rounded to
     the quantization grid), err = (w - q) / d_i, W[:, i:block_end] -= err * U[i, i:block_end],
     loss += sum((w - q)^2) / (2 d_i^2).
   - after the block: W[:, block_end:] -= Err_block @ U[block, block_end:].
   The total OBS loss sum (w - q)^2 / (2 d^2) is returned as ``extra["loss"]``.

Joint quantization (``wbits``, as ``--wbits`` in IST-DASLab/sparsegpt, GPTQ's quantizer):
asymmetric min-max per output row (range always includes 0, so 0 is on the grid):
scale = (max - min) / (2^b - 1), zero = round(-min / scale), q = clamp(round(w / scale) + zero,
0, 2^b - 1), value = scale * (q - zero). ``sym``: max = max(|min|, max), zero = 2^(b-1).
``groupsize`` g: scale/zero are recomputed at every g-th column from the current (already
updated) weights of those g columns; otherwise one grid per row, computed before the sweep.
Pruned weights stay exactly 0. The grid is returned as ``extra["quant"]`` (scale/zero of shape
(d_out, n_groups)). Kept weights that round to the grid's 0 are exactly 0 but still kept.

Defaults: percdamp 0.01, blocksize 128, damp_retries 4, no quantization, block 1x1. Computes in fp32 on the
weight's device and returns the weight in its input dtype.

    strataprune run --pruner sparsegpt --sparsity 0.5
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from strataprune.contract.errors import ConfigError, PluginError
from strataprune.contract.layout import MatrixStats
from strataprune.contract.pruner import Pruner, PruneResult
from strataprune.contract.sparsity import BlockShape, Target
from strataprune.plugins.common.linalg import (
    DAMP_RETRIES,
    PERCDAMP,
    cholesky_inverse,
    damped_cholesky,
    damping_note,
    finite_positive,
    single_thread,
)
from strataprune.plugins.common.masks import block_sums, expand_blocks

_WHERE = "pruner 'sparsegpt'"


@dataclass
class SparseGPTConfig:
    #: dampening added to diag(H), as a fraction of mean(diag H)
    percdamp: float = PERCDAMP
    #: columns per lazy-update block (the unstructured mask is chosen per block)
    blocksize: int = 128
    #: Cholesky retries, each with 10x the previous percdamp
    damp_retries: int = DAMP_RETRIES
    #: joint quantization bits (2..8), None = off
    wbits: int | None = None
    #: quantization group size in input columns, None = one grid per output row
    groupsize: int | None = None
    #: symmetric quantization grid
    sym: bool = False
    #: "RxC": tiles of R output rows x C input columns pruned whole ("1x1" = unstructured);
    #: typed Any so that a non-string gets the full message of BlockShape.parse
    block: Any = "1x1"

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, allowed: str) -> ConfigError:
            return ConfigError(f"{_WHERE}: {key}={value!r} is invalid; allowed: {allowed}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        p = self.percdamp
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
            raise bad("percdamp", p, "a finite number > 0 (e.g. 0.01)")
        if not is_int(self.blocksize) or self.blocksize < 1:
            raise bad("blocksize", self.blocksize, "an integer >= 1 (e.g. 128)")
        if not is_int(self.damp_retries) or self.damp_retries < 0:
            raise bad("damp_retries", self.damp_retries, "an integer >= 0 (e.g. 4)")
        if self.wbits is not None and (not is_int(self.wbits) or not 2 <= self.wbits <= 8):
            raise bad("wbits", self.wbits, "an integer from 2 to 8, or null (no quantization)")
        if self.groupsize is not None and (not is_int(self.groupsize) or self.groupsize < 1):
            raise bad("groupsize", self.groupsize, "a positive integer (e.g. 128), or null (one grid per output row)")
        if not isinstance(self.sym, bool):
            raise bad("sym", self.sym, "true or false")
        self.block = str(BlockShape.parse(self.block, _WHERE))


# --------------------------------------------------------------------------- pieces
def upper_of_inverse(lower: torch.Tensor) -> torch.Tensor | None:
    """U with U^T U = H^-1 from the lower Cholesky factor of H (None when it is not usable)."""
    upper = torch.linalg.cholesky(cholesky_inverse(lower), upper=True)
    return upper if bool(torch.isfinite(upper).all()) and finite_positive(torch.diagonal(upper)) else None


def quant_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's min-max grid per row of ``x`` (rows, k): returns scale, zero, each (rows,)."""
    maxq = 2**bits - 1
    zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.min(dim=1).values, zeros)
    xmax = torch.maximum(x.max(dim=1).values, zeros)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``x`` (rows,) onto the grid scale * (q - zero), q integer in [0, 2^bits - 1]."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return scale * (q - zero)


def _check_inputs(weight: torch.Tensor, hessian: torch.Tensor, target: Target, block: BlockShape, name: str) -> None:
    if weight.dim() != 2:
        raise PluginError(f"sparsegpt: {name} must be a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if tuple(hessian.shape) != (cols, cols):
        raise PluginError(f"sparsegpt: the Hessian of {name} has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    if target.pattern is not None and cols % target.pattern.m:
        raise ConfigError(
            f"N:M {target.pattern} needs the input dimension ({cols}) of {name} to be a multiple of {target.pattern.m}"
        )
    if target.pattern is None and not 0.0 <= target.ratio < 1.0:
        raise ConfigError(f"sparsity: {target.ratio} must be in [0, 1)")
    if not block.unit:
        if target.pattern is not None:
            raise ConfigError(f"block {block} cannot follow an N:M pattern ({target.pattern}); use a ratio target or block 1x1")
        block.check_shape(tuple(weight.shape), name)


# --------------------------------------------------------------------------- core
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: Target,
    *,
    percdamp: float = PERCDAMP,
    blocksize: int = 128,
    wbits: int | None = None,
    groupsize: int | None = None,
    sym: bool = False,
    damp_retries: int = DAMP_RETRIES,
    name: str = "matrix",
    block: BlockShape | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float, list[str], dict[str, Any] | None]:
    """Prune (and optionally quantize) one matrix with SparseGPT; pure: the inputs are not modified.

    ``block`` (default 1x1): prune whole tiles of that shape, chosen per slab by summed saliency.

    Returns (new_weight in weight.dtype with exact zeros where pruned, keep bool mask,
    total OBS loss sum (w - q)^2 / (2 d^2), notes, quant grid dict or None).
    """
    block = block or BlockShape()
    _check_inputs(weight, hessian, target, block, name)
    if weight.device.type == "cuda":
        # the reference code disables TF32: its 10-bit mantissa visibly degrades the OBS updates
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return _sparsegpt_prune(
                weight, hessian, target, percdamp, blocksize, wbits, groupsize, sym, damp_retries, name, block
            )
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    with single_thread():  # the column sweep is thousands of tiny ops: threads only add synchronisation
        return _sparsegpt_prune(weight, hessian, target, percdamp, blocksize, wbits, groupsize, sym, damp_retries, name, block)


def _sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: Target,
    percdamp: float,
    blocksize: int,
    wbits: int | None,
    groupsize: int | None,
    sym: bool,
    damp_retries: int,
    name: str,
    block: BlockShape,
) -> tuple[torch.Tensor, torch.Tensor, float, list[str], dict[str, Any] | None]:
    rows, cols = weight.shape
    device = weight.device
    notes: list[str] = []

    W = weight.detach().to(device=device, dtype=torch.float32).clone()
    try:  # dead inputs get H_jj = 1 there; their weights are zeroed here
        damped = damped_cholesky(hessian.to(device), percdamp, damp_retries, then=upper_of_inverse, who=name)
    except PluginError as exc:
        raise PluginError(f"sparsegpt: {exc}") from None
    if bool(damped.dead.any()):
        W[:, damped.dead] = 0.0
    Hinv = damped.result
    notes += damping_note(damped)

    pattern = target.pattern
    if pattern is not None:
        n_prune = pattern.m - pattern.n
        # N:M groups must not straddle a block: use a multiple of m
        bs = max(pattern.m, blocksize - blocksize % pattern.m)
        if bs != blocksize:
            notes.append(f"blocksize {blocksize} -> {bs} (a multiple of m={pattern.m})")
    else:
        n_prune = 0
        # tiles must not straddle a slab: a multiple of C (the input dimension is one, checked above)
        bs = max(block.cols, blocksize - blocksize % block.cols)
        if bs != blocksize:
            notes.append(f"blocksize {blocksize} -> {bs} (a multiple of the block's {block.cols} columns)")

    quant: dict[str, Any] | None = None
    if wbits is not None:
        g = groupsize if groupsize is not None else cols
        ngroups = -(-cols // g)
        q_scale = torch.zeros(rows, ngroups, dtype=torch.float32, device=device)
        q_zero = torch.zeros(rows, ngroups, dtype=torch.float32, device=device)
        if groupsize is None:
            s, z = quant_params(W, wbits, sym)
            q_scale[:, 0], q_zero[:, 0] = s, z
        scale = q_scale[:, 0]
        zero = q_zero[:, 0]

    mask = torch.zeros(rows, cols, dtype=torch.bool, device=device)  # True = pruned
    losses = torch.zeros(rows, dtype=torch.float32, device=device)

    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(Hinv1)

        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if pattern is None and not block.unit:
            tiles = block_sums(W1**2 / (d1.unsqueeze(0) ** 2), block)
            # the matrix's floor(tiles * s), slab by slab: floor(tiles up to i2 * s) - floor(tiles up to i1 * s),
            # so the total is exact (a floor per slab would lose up to a tile per slab: 0.4% at 16x16 on 576 x 576)
            tile_rows = rows // block.rows  # i1 and i2 are multiples of the block's columns
            k = int(tile_rows * (i2 // block.cols) * target.ratio) - int(tile_rows * (i1 // block.cols) * target.ratio)
            if k:
                tile_mask = torch.zeros(tiles.numel(), dtype=torch.bool, device=device)
                tile_mask[torch.sort(tiles.flatten(), stable=True).indices[:k]] = True
                mask1 = expand_blocks(tile_mask.view_as(tiles), block)
        elif pattern is None:
            k = int(W1.numel() * target.ratio)
            if k:
                sal = (W1**2 / (d1.unsqueeze(0) ** 2)).flatten()
                idx = torch.sort(sal, stable=True).indices[:k]
                mask1.view(-1)[idx] = True

        for i in range(count):
            col = i1 + i
            w = W1[:, i]
            d = Hinv1[i, i]
            if pattern is not None and col % pattern.m == 0:
                sal = W1[:, i : i + pattern.m] ** 2 / (d1[i : i + pattern.m].unsqueeze(0) ** 2)
                low = torch.sort(sal, dim=1, stable=True).indices[:, :n_prune]
                mask1[:, i : i + pattern.m].scatter_(1, low, True)

            if wbits is not None:
                if groupsize is not None and col % groupsize == 0:
                    gi = col // groupsize
                    end = min(col + groupsize, cols)
                    cur = W1[:, i : min(i2, end) - i1]
                    if end > i2:  # the group reaches past this block: apply the pending lazy update
                        later = W[:, i2:end] - Err1.matmul(Hinv[i1:i2, i2:end])
                        cur = torch.cat([cur, later], dim=1)
                    s, z = quant_params(cur, wbits, sym)
                    q_scale[:, gi], q_zero[:, gi] = s, z
                    scale, zero = s, z
                q = quantize(w, scale, zero, wbits).masked_fill_(mask1[:, i], 0.0)
            else:
                q = w.masked_fill(mask1[:, i], 0.0)

            Q1[:, i] = q
            err = (w - q) / d
            Losses1[:, i] = err * err  # (w - q)^2 / d^2
            # rank-1 update of the rest of the block (addr_ avoids building the outer product separately)
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            Err1[:, i] = err

        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        losses += Losses1.sum(dim=1) / 2
        if i2 < cols:
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    W[mask] = 0.0
    new_weight = W.to(weight.dtype)
    new_weight[mask] = 0  # exact zeros survive any dtype cast anyway; be explicit
    if wbits is not None:
        quant = {"bits": wbits, "groupsize": groupsize, "sym": sym, "scale": q_scale, "zero": q_zero}
    return new_weight, ~mask, float(losses.sum()), notes, quant


# --------------------------------------------------------------------------- plugin
class SparseGPT(Pruner):
    name = "sparsegpt"
    #: 2: the dampening's mean(diag H) is taken over a contiguous copy of the diagonal, as the reference's
    #: torch.mean(torch.diag(H)); version 1 summed the strided view, one float32 ulp away, which at
    #: 512 calibration tokens on SmolLM2 (H rank-deficient, the dampening carries it) moved 2:4 perplexity 262 -> 323
    version = "2"
    summary = "OBS mask selection + weight update from the Hessian, optional joint INT-b (Frantar & Alistarh 2023)"
    Config = SparseGPTConfig
    needs = frozenset({"hessian"})
    updates_weights = True

    @property
    def quantizes(self) -> bool:
        """Whether this pruner also quantizes (the host then checks and saves the grids)."""
        return self.config.wbits is not None

    def unquantized(self) -> SparseGPT:
        """The same pruner without quantization: the host's sparse-only reference for INT-b runs."""
        return SparseGPT(dataclasses.replace(self.config, wbits=None, groupsize=None, sym=False))

    @property
    def block_shape(self) -> BlockShape:
        return BlockShape.parse(self.config.block, _WHERE)

    def prune(self, weight: torch.Tensor, target: Target, stats: MatrixStats) -> PruneResult:
        name = stats.info.name
        if stats.hessian is None:
            raise PluginError(f"sparsegpt needs hessian statistics for {name}, which the calibration engine did not provide")
        c = self.config
        new_weight, keep, loss, notes, quant = sparsegpt_prune(
            weight,
            stats.hessian,
            target,
            percdamp=c.percdamp,
            blocksize=c.blocksize,
            wbits=c.wbits,
            groupsize=c.groupsize,
            sym=c.sym,
            damp_retries=c.damp_retries,
            name=name,
            block=self.block_shape,
        )
        extra: dict[str, Any] = {"loss": loss}
        if quant is not None:
            extra["quant"] = quant
        return PruneResult(keep=keep, weight=new_weight, notes=notes, extra=extra)
