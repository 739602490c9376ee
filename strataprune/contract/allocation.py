"""Allocation: the sparsity ratio of every prunable matrix, and the helpers that build and check it.

Every allocator's output goes through ``validate``: the keys are exactly the prunable matrices,
each ratio lies in [0, 1), and the allocation's mean rule holds within 1e-3. The rules are a closed
set the host knows (``MEAN_RULES``); a plugin can pick one but never switch the check off:

- ``"weighted"`` (default): the parameter-weighted mean of the matrix ratios equals the target.
- ``"block-mean"``: the unweighted mean of the block ratios equals the target. This is the
  published rule of ATP, OWL and LoSA, which their ``normalize: paper`` modes keep; on models whose
  blocks differ in size the parameter-weighted mean then differs from the target by
  sum_l (n_l/N - 1/L) s_l, which the report shows (``weighted_mean``).

N:M patterns move a matrix to the nearest multiple of 1/m, so an allocation that carries patterns
may miss its rule by at most 1/(2m) more. The host's own rounding of plain ratios to n:m
(core.pipeline.nm_for_ratio) happens after the allocator's output was validated exactly.
``redistribute`` is the shared clip-and-redistribute step (a parameter-weighted water-filling
shift) for allocators whose raw ratios leave the bounds or miss the target.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from strataprune.contract.errors import PluginError
from strataprune.contract.layout import ModelLayout
from strataprune.contract.sparsity import NMPattern

FORMAT_VERSION = 1
MEAN_TOLERANCE = 1e-3
#: what an allocation keeps equal to the target (module docstring); the host checks the one named
MEAN_RULES = {
    "weighted": "parameter-weighted mean of the matrix ratios",
    "block-mean": "unweighted mean of the block ratios (the published rule of ATP, OWL and LoSA)",
}
#: highest ratio the safe normalisation hands out; 1.0 would empty a matrix
MAX_RATIO = 0.99


@dataclass
class Allocation:
    """Matrix name -> sparsity ratio (and, for N:M runs, matrix name -> pattern)."""

    ratios: dict[str, float]
    target: float
    allocator: str = ""
    patterns: dict[str, NMPattern] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    #: which mean equals the target (a key of MEAN_RULES); checked by ``validate``
    mean_rule: str = "weighted"

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_blocks(cls, layout: ModelLayout, block_ratios: Sequence[float], target: float, **kw: Any) -> Allocation:
        if len(block_ratios) != layout.num_blocks:
            raise PluginError(f"allocation has {len(block_ratios)} block ratios but the model has {layout.num_blocks} blocks")
        return cls({m.name: float(block_ratios[m.block]) for m in layout.matrices}, target, **kw)

    @classmethod
    def uniform(cls, layout: ModelLayout, target: float, **kw: Any) -> Allocation:
        return cls({name: float(target) for name in layout.names}, target, **kw)

    @classmethod
    def coerce(cls, raw: Any, layout: ModelLayout, target: float, allocator: str) -> Allocation:
        """Accept what an allocator may return: Allocation, mapping, or per-block sequence."""
        if isinstance(raw, Allocation):
            raw.allocator = raw.allocator or allocator
            return raw
        if isinstance(raw, Mapping):
            return cls({str(k): float(v) for k, v in raw.items()}, target, allocator)
        if isinstance(raw, (Sequence, np.ndarray)) and not isinstance(raw, str):
            return cls.from_blocks(layout, [float(x) for x in raw], target, allocator=allocator)
        raise PluginError(
            f"allocator '{allocator}' returned {type(raw).__name__}; expected an Allocation, a mapping or a list of block ratios"
        )

    # ---------------------------------------------------------------- queries
    def weighted_mean(self, layout: ModelLayout) -> float:
        total = sum(layout[n].numel for n in self.ratios)
        return sum(r * layout[n].numel for n, r in self.ratios.items()) / total

    def block_mean(self, layout: ModelLayout) -> float:
        """Unweighted mean of the block ratios, over the blocks that hold prunable matrices."""
        profile = self.block_profile(layout)
        values = [profile[b] for b in range(layout.num_blocks) if layout.block(b)]
        return sum(values) / len(values) if values else self.target

    def rounding_slack(self) -> float:
        """How far N:M patterns may move the mean: half a step of the coarsest pattern, 1/(2m)."""
        return max((0.5 / p.m for p in self.patterns.values()), default=0.0)

    def mean_report(self, layout: ModelLayout) -> dict[str, Any]:
        """The realised means next to the target, for allocation.json and report.json."""
        return {
            "mean_rule": self.mean_rule,
            "target": self.target,
            "weighted_mean": self.weighted_mean(layout),
            "block_mean": self.block_mean(layout),
        }

    def block_profile(self, layout: ModelLayout) -> list[float]:
        """Parameter-weighted ratio of each block."""
        out = []
        for b in range(layout.num_blocks):
            mats = layout.block(b)
            numel = sum(m.numel for m in mats)
            out.append(sum(self.ratios[m.name] * m.numel for m in mats) / numel if numel else 0.0)
        return out

    def validate(self, layout: ModelLayout, tolerance: float | None = MEAN_TOLERANCE) -> Allocation:
        """Raise PluginError unless the keys, ratios, patterns and mean rule hold.

        ``tolerance=None`` checks everything but the mean (the host's own N:M rounding, applied
        after the allocator's output passed the full check).
        """
        who = f"allocator '{self.allocator}'" if self.allocator else "allocation"
        missing = [n for n in layout.names if n not in self.ratios]
        extra = [n for n in self.ratios if n not in layout]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} matrices (e.g. {missing[0]})")
            if extra:
                parts.append(f"unknown matrices {extra[:3]}")
            raise PluginError(f"{who}: keys do not match the prunable matrices: {'; '.join(parts)}")
        for name, ratio in self.ratios.items():
            if not (isinstance(ratio, float) and math.isfinite(ratio) and 0.0 <= ratio < 1.0):
                raise PluginError(f"{who}: ratio of {name} is {ratio!r}, must be in [0, 1)")
        for name, pattern in self.patterns.items():
            if name not in layout:
                raise PluginError(f"{who}: N:M pattern for unknown matrix {name}")
            if abs(pattern.sparsity - self.ratios[name]) > 1e-9:
                raise PluginError(f"{who}: {name} has pattern {pattern} but ratio {self.ratios[name]}")
        if self.mean_rule not in MEAN_RULES:
            raise PluginError(f"{who}: mean_rule {self.mean_rule!r} is not one of: {', '.join(MEAN_RULES)}")
        if tolerance is None:
            return self
        slack = tolerance + self.rounding_slack()
        mean = self.weighted_mean(layout) if self.mean_rule == "weighted" else self.block_mean(layout)
        if not abs(mean - self.target) <= slack:
            rounding = f" (incl. {self.rounding_slack():g} for N:M rounding)" if self.patterns else ""
            raise PluginError(
                f"{who}: {MEAN_RULES[self.mean_rule]} is {mean:.5f}, which differs from the target "
                f"{self.target:.5f} by more than {slack:g}{rounding}"
            )
        return self

    # ---------------------------------------------------------------- serialisation
    def to_dict(self, layout: ModelLayout | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "allocator": self.allocator,
            "target": self.target,
            "ratios": self.ratios,
        }
        if self.patterns:
            data["patterns"] = {k: str(v) for k, v in self.patterns.items()}
        data["mean_rule"] = self.mean_rule
        if layout is not None:
            data["weighted_mean"] = self.weighted_mean(layout)
            data["block_mean"] = self.block_mean(layout)
            data["block_profile"] = self.block_profile(layout)
        data["meta"] = self.meta
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Allocation:
        if data.get("format_version") != FORMAT_VERSION:
            raise PluginError(
                f"allocation format_version {data.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
            )
        return cls(
            ratios={k: float(v) for k, v in data["ratios"].items()},
            target=float(data["target"]),
            allocator=data.get("allocator", ""),
            patterns={k: NMPattern.parse(v) for k, v in data.get("patterns", {}).items()},
            meta=dict(data.get("meta", {})),
            mean_rule=str(data.get("mean_rule", "weighted")),
        )

    def save(self, path: Path, layout: ModelLayout | None = None) -> None:
        Path(path).write_text(json.dumps(self.to_dict(layout), indent=2))

    @classmethod
    def load(cls, path: Path) -> Allocation:
        return cls.from_dict(json.loads(Path(path).read_text()))


def redistribute(
    ratios: Sequence[float] | np.ndarray,
    weights: Sequence[float] | np.ndarray,
    target: float,
    lo: float = 0.0,
    hi: float = MAX_RATIO,
) -> np.ndarray:
    """Clip to [lo, hi] and shift all unclipped ratios by one constant so the weighted mean is ``target``.

    This is water-filling: find c with sum_i w_i * clip(r_i + c, lo, hi) = target * sum_i w_i.
    The left side is continuous and non-decreasing in c, so bisection finds c to machine precision.
    Order among the ratios is preserved (ties apart).
    """
    r = np.asarray(ratios, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if not lo <= target <= hi:
        raise PluginError(f"target {target} lies outside the allowed range [{lo}, {hi}]")
    if r.size == 0:
        return r
    total = w.sum()

    def mean_at(c: float) -> float:
        return float((w * np.clip(r + c, lo, hi)).sum() / total)

    a, b = lo - r.max() - 1.0, hi - r.min() + 1.0
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mean_at(mid) < target:
            a = mid
        else:
            b = mid
    return np.clip(r + 0.5 * (a + b), lo, hi)


def scale_to_target(ratios: Sequence[float] | np.ndarray, weights: Sequence[float] | np.ndarray, target: float) -> np.ndarray:
    """Multiply by one constant so the weighted mean is ``target`` (AlphaPruning's normalisation)."""
    r = np.asarray(ratios, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    return r * (target * w.sum() / (w * r).sum())
