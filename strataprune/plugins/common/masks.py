"""Mask selection shared by pruners: lowest scores go first, with exact counts; whole blocks with ``block``."""

from __future__ import annotations

import torch

from strataprune.contract.sparsity import BlockShape, NMPattern, Target

#: rows handled at once by keep_by_rows, in elements (1M fp32 scores: ~15 MB of temporaries)
ROW_CHUNK_ELEMENTS = 1 << 20


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k lowest entries of every row of ``scores`` (rows, n), ties broken by position.

    The same entries as a stable sort's first k, found by selection instead of sorting (about 3x
    faster on the CPU): the k-th smallest value v of each row, every entry below v, and of the entries
    equal to v the first ones until k are taken. NaN counts as the largest value, as in a sort.
    """
    kth = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    at_most = scores <= kth
    if bool((at_most.sum(dim=1) == k).all()):  # the usual case: no other entry equals a row's k-th value
        return at_most
    nan, nan_kth = torch.isnan(scores), torch.isnan(kth)
    below = (scores < kth) | (nan_kth & ~nan)  # a NaN k-th value lies above every number
    ties = (scores == kth) | (nan & nan_kth)
    need = k - below.sum(dim=1, keepdim=True)
    return below | (ties & (ties.cumsum(dim=1) <= need))


def keep_by_rows(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune the floor(d_in * ratio) lowest scores of every row (Wanda's comparison group), ties by position."""
    rows, cols = scores.shape
    k = int(cols * ratio)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        # a few rows at a time: the selection's temporaries (a copy, masks, an int64 tie count) stay small
        step = max(1, ROW_CHUNK_ELEMENTS // cols)
        for start in range(0, rows, step):
            keep[start : start + step] = ~_prune_lowest(scores[start : start + step], k)
    return keep


def keep_by_matrix(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Prune the floor(numel * ratio) lowest scores of the whole matrix (magnitude's comparison group).

    Exactly k entries go, ties broken by position, so realised sparsity never exceeds the ratio by ties.
    """
    k = int(scores.numel() * ratio)
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        flat = scores.flatten()
        kth = torch.kthvalue(flat, k).values
        nan, nan_kth = torch.isnan(flat), bool(torch.isnan(kth))
        below = (flat < kth) | (~nan if nan_kth else torch.zeros_like(nan))
        ties = (flat == kth) | (nan & nan_kth)
        need = k - int(below.sum())
        keep &= ~below
        keep[torch.nonzero(ties).squeeze(1)[:need]] = False  # ties are few: their positions, in order
    return keep.view_as(scores)


def keep_nm(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Keep the n highest scores in every group of m consecutive input columns of each row."""
    rows, cols = scores.shape
    if cols % pattern.m:
        from strataprune.contract.errors import ConfigError

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


# --------------------------------------------------------------------------- block sparsity
def block_sums(scores: torch.Tensor, block: BlockShape) -> torch.Tensor:
    """The score of every ``block`` tile of ``scores`` (rows, cols): the sum of its members, in fp64.

    fp64 so that the ranking of tiles does not depend on the order the members are added in.
    Shape (rows / R, cols / C); the caller has checked divisibility.
    """
    rows, cols = scores.shape
    tiles = scores.reshape(rows // block.rows, block.rows, cols // block.cols, block.cols)
    return tiles.sum(dim=(1, 3), dtype=torch.float64)


def expand_blocks(tile_mask: torch.Tensor, block: BlockShape) -> torch.Tensor:
    """A per-tile mask (rows / R, cols / C) spread over the members of each tile: (rows, cols)."""
    return tile_mask.repeat_interleave(block.rows, dim=0).repeat_interleave(block.cols, dim=1)


def split_evenly(total: int, groups: int) -> torch.Tensor:
    """``total`` items over ``groups`` groups: group g gets floor((g+1)·total/groups) − floor(g·total/groups).

    Every group gets floor(total/groups) or one more, the extra ones spread evenly by position, and the
    counts add up to exactly ``total``.
    """
    edges = torch.arange(groups + 1, dtype=torch.int64) * total // groups
    return edges[1:] - edges[:-1]


def keep_block_rows(tile_scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Tile selection per row of tiles (an R-row group): floor(tiles · ratio) tiles pruned in all.

    Each row of ``tile_scores`` prunes its lowest tiles (ties by position); how many is the matrix's
    floor(tiles · ratio) split evenly over the rows (``split_evenly``), so the matrix count is exact even
    when a row's share is not a whole number of tiles (a per-row floor would lose up to C/d_in of the ratio).
    """
    groups, per_group = tile_scores.shape
    counts = split_evenly(int(groups * per_group * ratio), groups)
    keep = torch.ones_like(tile_scores, dtype=torch.bool)
    step = max(1, ROW_CHUNK_ELEMENTS // per_group)  # a few rows at a time, as keep_by_rows
    for start in range(0, groups, step):
        chunk, chunk_counts = tile_scores[start : start + step], counts[start : start + step]
        for k in chunk_counts.unique().tolist():  # at most two counts: floor and floor + 1
            if k:
                rows = torch.nonzero(chunk_counts == k).squeeze(1)
                keep[start + rows] = ~_prune_lowest(chunk[rows], k)
    return keep


def keep_blocks_for_target(scores: torch.Tensor, target: Target, group: str, block: BlockShape, name: str) -> torch.Tensor:
    """Keep whole ``block`` tiles by the sum of their members' scores, compared within ``group``.

    ``group`` "matrix": floor(tiles · ratio) lowest tiles of the whole matrix go (magnitude's rule at tile
    granularity); "row": the comparison group is one row of tiles, i.e. R output rows (Wanda's rule), with
    the count split as in ``keep_block_rows``. ``block`` 1x1 is ``keep_for_target``, unchanged. N:M is refused.
    """
    if block.unit:
        return keep_for_target(scores, target, group)
    if target.pattern is not None:
        from strataprune.contract.errors import ConfigError

        raise ConfigError(f"block {block} cannot follow an N:M pattern ({target.pattern}); use a ratio target or block 1x1")
    block.check_shape(tuple(scores.shape), name)
    tiles = block_sums(scores, block)
    keep = keep_block_rows(tiles, target.ratio) if group == "row" else keep_by_matrix(tiles, target.ratio)
    return expand_blocks(keep, block)
