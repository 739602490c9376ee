"""Mask selection shared by pruners: lowest scores go first, with exact counts."""

from __future__ import annotations

import torch

from .sparsity import NMPattern, Target

#: rows sorted at once by keep_by_rows, in elements (1M fp32 scores: ~12 MB of sort temporaries)
ROW_CHUNK_ELEMENTS = 1 << 20


def keep_by_rows(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune the floor(d_in * ratio) lowest scores of every row (Wanda's comparison group)."""
    rows, cols = scores.shape
    k = int(cols * ratio)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        # a few rows at a time: a whole-matrix sort holds values and int64 indices, 3x the matrix
        step = max(1, ROW_CHUNK_ELEMENTS // cols)
        for start in range(0, rows, step):
            idx = torch.sort(scores[start : start + step], dim=1, stable=True).indices[:, :k]
            keep[start : start + step].scatter_(1, idx, False)
    return keep


def keep_by_matrix(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune the floor(numel * ratio) lowest scores of the whole matrix (magnitude's comparison group).

    Exactly k entries go, ties broken by position, so realised sparsity never exceeds the ratio by ties.
    """
    k = int(scores.numel() * ratio)
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        idx = torch.sort(scores.flatten(), stable=True).indices[:k]
        keep[idx] = False
    return keep.view_as(scores)


def keep_nm(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Keep the n highest scores in every group of m consecutive input columns of each row."""
    rows, cols = scores.shape
    if cols % pattern.m:
        from .errors import ConfigError

        raise ConfigError(f"N:M {pattern} needs the input dimension ({cols}) to be a multiple of {pattern.m}")
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)
    idx = torch.topk(groups, pattern.n, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, idx, True)
    return keep.reshape(rows, cols)


def keep_for_target(scores: torch.Tensor, target: Target, group: str = "row") -> torch.Tensor:
    if target.pattern is not None:
        return keep_nm(scores, target.pattern)
    return keep_by_rows(scores, target.ratio) if group == "row" else keep_by_matrix(scores, target.ratio)
