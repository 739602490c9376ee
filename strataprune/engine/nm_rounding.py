"""The host's N:M rounding: an unstructured allocation under an N:M run becomes a pattern per matrix."""

from __future__ import annotations

import math

from strataprune.contract.allocation import Allocation
from strataprune.contract.layout import ModelLayout
from strataprune.contract.sparsity import NMPattern, Target


def nm_for_ratio(ratio: float, m: int) -> NMPattern:
    """Rounding policy for an unstructured ratio under an N:M run: the nearest n:m pattern.

    Used when the run's target is an N:M pattern (say 2:4) but the allocator hands out plain
    ratios (ATP, AlphaPruning, OWL ... give every block its own ratio): each matrix gets
    ``n = round((1 - ratio) * m)`` kept weights out of every ``m`` (``m`` is the run's), so its
    sparsity ``1 - n/m`` is the multiple of ``1/m`` nearest to the asked ratio. The rules:

    - ties (a ratio exactly halfway between two patterns) go to the *denser* pattern (larger n),
      since pruning less than asked is the safer error; Python's round() would send them to the
      even n, which is arbitrary;
    - n is clamped to [1, m - 1]: every group keeps at least one weight and prunes at least one,
      so ratios below 1/m become (m-1):m and ratios above (m-1)/m become 1:m;
    - a uniform allocation at the pattern's own ratio maps back to that pattern exactly
      (0.5 -> 2:4, 0.5 -> 4:8);
    - the parameter-weighted mean of the rounded ratios is in general *not* the target: each
      matrix moves by at most 1/(2m), or up to 1/m where the clamp applies (ratios below 1/(2m) or
      above 1 - 1/(2m)); the allocator's own output was validated exactly before, and
      ``meta['nm_rounding']`` records the largest move and the means before and after.

    Allocators that want N:M per block themselves (OWL's mixed N:M, §5.4) set
    ``Allocation.patterns`` and this policy is not applied.
    """
    # the 1e-9 absorbs float noise such as (1 - 0.7) * 4 = 1.2000000000000002 without moving real ties
    n = int(math.floor((1.0 - ratio) * m + 0.5 + 1e-9))
    return NMPattern(min(m - 1, max(1, n)), m)


def round_to_nm(allocation: Allocation, layout: ModelLayout, target: Target) -> None:
    """Under an N:M run, give every matrix without a pattern the nearest n:m (``nm_for_ratio``), in place."""
    if target.pattern is None or allocation.patterns:
        return
    m = target.pattern.m
    before = allocation.weighted_mean(layout)
    allocation.patterns = {n: nm_for_ratio(r, m) for n, r in allocation.ratios.items()}
    moves = [abs(allocation.patterns[n].sparsity - r) for n, r in allocation.ratios.items()]
    allocation.ratios = {n: p.sparsity for n, p in allocation.patterns.items()}
    allocation.meta["nm_rounding"] = {
        "rule": f"each ratio rounded to the nearest n:{m} (n = round((1 - ratio) * {m}), ties denser, 1 <= n <= {m - 1})",
        "largest_move": max(moves, default=0.0),
        "weighted_mean_before": before,
        "weighted_mean_after": allocation.weighted_mean(layout),
    }
