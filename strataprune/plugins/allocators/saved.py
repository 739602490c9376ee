"""A saved allocation: the ratios of an earlier run's ``allocation.json``, used as they are.

A searched allocation (EvoPress, ATP with beta searched) costs many prunes' worth of time; this lets a later
run reuse it with another pruner, a refinement or a recovery without searching again:

    strataprune run --allocator evopress --sparsity 0.7 --output evo/
    strataprune run --allocator saved --set allocator.path=evo/allocation.json --sparsity 0.7 \\
        --recovery lora --set recovery.steps=1000

The file must be for the same model (every prunable matrix named, none unknown) and the same target; the
host then validates it like any allocator's output (ratios in [0, 1), the mean rule, N:M patterns).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from strataprune.contract.allocation import MEAN_RULES, MEAN_TOLERANCE, Allocation
from strataprune.contract.allocator import AllocationContext, Allocator
from strataprune.contract.errors import ConfigError, DataError, PluginError, require

_require = functools.partial(require, where="allocator 'saved'")

#: an allocation.json of a 7B model is about 20 KB; anything far larger is not one
MAX_FILE_BYTES = 64 * 1024 * 1024


@dataclass
class SavedConfig:
    #: an ``allocation.json`` written by ``strataprune run`` or ``strataprune allocate``
    path: str = ""

    def __post_init__(self) -> None:
        _require(isinstance(self.path, str) and self.path.strip() != "", "path", self.path, "the path of an allocation.json")
        read_allocation(Path(self.path).expanduser())  # a missing or malformed file fails before the model loads


def read_allocation(path: Path) -> tuple[Allocation, str]:
    """The allocation stored at ``path`` and the sha256 of the file's bytes; DataError for a file that is not one."""
    if not path.is_file():
        raise DataError(f"allocator 'saved': path={str(path)!r} is not a file; allowed: the path of an allocation.json")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataError(f"allocator 'saved': {str(path)!r} is {size} bytes, too large for an allocation.json")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"allocator 'saved': {str(path)!r} is not JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("ratios"), dict) or "target" not in data:
        raise DataError(f"allocator 'saved': {str(path)!r} is not an allocation.json (no 'ratios' and 'target')")
    for key in ("patterns", "meta"):
        if not isinstance(data.get(key, {}), dict):
            raise DataError(f"allocator 'saved': {str(path)!r}: '{key}' is {type(data[key]).__name__}, not an object")
    if data.get("mean_rule", "weighted") not in MEAN_RULES:
        raise DataError(f"allocator 'saved': {str(path)!r}: mean_rule={data['mean_rule']!r}; allowed: {', '.join(MEAN_RULES)}")
    try:
        allocation = Allocation.from_dict(data)
    except PluginError as exc:
        raise DataError(f"allocator 'saved': {str(path)!r}: {exc}") from None
    except (TypeError, ValueError, AttributeError, ConfigError) as exc:
        raise DataError(f"allocator 'saved': {str(path)!r} holds a malformed allocation ({exc})") from None
    bad = [name for name, ratio in allocation.ratios.items() if not 0.0 <= ratio < 1.0]  # NaN fails both
    if bad:
        raise DataError(f"allocator 'saved': {str(path)!r}: ratio of {bad[0]} is {allocation.ratios[bad[0]]!r}; allowed: [0, 1)")
    return allocation, hashlib.sha256(raw).hexdigest()


class Saved(Allocator):
    name = "saved"
    version = "1"
    summary = "the ratios of an earlier run's allocation.json (reuse a searched allocation)"
    Config = SavedConfig
    reads = ("path",)

    def allocate(self, ctx: AllocationContext) -> Allocation:
        path = Path(self.config.path).expanduser()
        stored, digest = read_allocation(path)
        if abs(stored.target - ctx.target.ratio) > MEAN_TOLERANCE:
            raise ConfigError(
                f"allocator 'saved': {str(path)!r} is an allocation for target {stored.target:g}, "
                f"the run's target is {ctx.target.ratio:g}; allowed: a file made at the run's target"
            )
        pattern = ctx.target.pattern
        if pattern is not None and any(stored.patterns.get(n) != pattern for n in ctx.layout.names):
            raise ConfigError(
                f"allocator 'saved': {str(path)!r} does not give every matrix the run's pattern {pattern}; "
                "allowed: an allocation made for the same N:M target"
            )
        if pattern is None and stored.patterns:
            raise ConfigError(
                f"allocator 'saved': {str(path)!r} holds N:M patterns but the run's target is unstructured; "
                f"allowed: an allocation made for target {ctx.target.ratio:g}"
            )
        allocation = Allocation(
            ratios=dict(stored.ratios),
            target=ctx.target.ratio,
            patterns=dict(stored.patterns),
            meta={"source": {"path": str(path), "sha256": digest, "allocator": stored.allocator}},
            mean_rule=stored.mean_rule,
        )
        try:
            allocation.validate(ctx.layout)
        except PluginError as exc:
            raise ConfigError(f"allocator 'saved': {str(path)!r} does not fit this model: {exc}") from None
        allocation.allocator = self.name
        return allocation
