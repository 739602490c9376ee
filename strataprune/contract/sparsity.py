"""Sparsity targets: an unstructured ratio or an N:M pattern, and checks of realised masks.

Convention (NVIDIA's, and the one the N:M checks use): ``n:m`` keeps at most ``n`` nonzeros in
every group of ``m`` consecutive input weights of a row, so 2:4 is 50% sparse and 1:4 is 75%.
The paper repos (Wanda, SparseGPT, OWL: ``prune_n, prune_m``) count *pruned* weights instead: their
``1:4`` is our ``3:4``. Both readings agree only when n = m - n (2:4, 4:8); for any other pattern
``paper_notation_warning`` gives the one-line warning the CLI prints.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from strataprune.contract.errors import ConfigError

if TYPE_CHECKING:
    import torch

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive input weights of each row."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise ConfigError(
                f"N:M pattern {self.n}:{self.m} is invalid: need integers with 0 < n < m, n weights kept of every m (e.g. 2:4, "
                "4:8)"
            )

    @classmethod
    def parse(cls, text: str | NMPattern) -> NMPattern:
        if isinstance(text, NMPattern):
            return text
        match = _NM_RE.match(str(text))
        if not match:
            raise ConfigError(
                f"N:M pattern '{text}' is invalid: write it as 'n:m' with integers 0 < n < m, n kept of every m (e.g. '2:4')"
            )
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


#: the sides a block may have: powers of two up to 16 (the kernels' register tiles)
BLOCK_SIDES = (1, 2, 4, 8, 16)
_BLOCK_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
_BLOCK_ALLOWED = (
    "a string 'RxC' (R consecutive output rows by C consecutive input columns kept or removed together), "
    "R and C each one of 1, 2, 4, 8, 16, e.g. '4x1', '1x4', '2x2'; '1x1' is unstructured"
)


@dataclass(frozen=True)
class BlockShape:
    """A block-sparsity pattern: the mask is constant on every ``rows`` x ``cols`` tile of a (out, in) weight.

    ``rows`` counts output features (rows of the weight), ``cols`` input features: 4x1 ties four
    consecutive output rows to the same kept columns, 1x4 keeps or removes four adjacent inputs of one row.
    1x1 is plain unstructured sparsity.
    """

    rows: int = 1
    cols: int = 1

    @classmethod
    def parse(cls, value: object, where: str) -> BlockShape:
        """The shape named by a recipe value such as '4x1'; a ConfigError naming ``where`` and the value otherwise."""
        if isinstance(value, BlockShape):
            return value
        match = _BLOCK_RE.match(value) if isinstance(value, str) else None
        if match is None or int(match.group(1)) not in BLOCK_SIDES or int(match.group(2)) not in BLOCK_SIDES:
            raise ConfigError(f"{where}: block={value!r} is invalid; allowed: {_BLOCK_ALLOWED}")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def unit(self) -> bool:
        """Whether this is 1x1, i.e. no block structure."""
        return self.rows == 1 and self.cols == 1

    @property
    def size(self) -> int:
        return self.rows * self.cols

    def check_shape(self, shape: tuple[int, ...], name: str) -> None:
        """Refuse a matrix whose rows are not a multiple of ``rows`` or whose inputs are not a multiple of ``cols``."""
        out_features, in_features = shape
        if out_features % self.rows or in_features % self.cols:
            raise ConfigError(
                f"block {self}: {name} has shape {tuple(shape)} (out, in); its {out_features} output rows must be a "
                f"multiple of {self.rows} and its {in_features} inputs a multiple of {self.cols}; use a block that divides "
                "every prunable matrix (e.g. 1x1)"
            )

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"


@dataclass(frozen=True)
class Target:
    """What a pruner is asked for on one matrix: a ratio, and optionally an N:M pattern."""

    ratio: float
    pattern: NMPattern | None = None

    @classmethod
    def of(cls, ratio: float | None = None, pattern: NMPattern | str | None = None) -> Target:
        if pattern is not None:
            pattern = NMPattern.parse(pattern)
            return cls(pattern.sparsity, pattern)
        check_ratio(ratio, "sparsity")
        return cls(float(ratio))

    def __str__(self) -> str:
        return str(self.pattern) if self.pattern else f"{self.ratio:.4g}"


def paper_notation_warning(pattern: NMPattern | None) -> str | None:
    """One line when ``pattern`` would mean the opposite sparsity in the paper repos (n pruned of m), else None."""
    if pattern is None or 2 * pattern.n == pattern.m:
        return None
    flipped = NMPattern(pattern.m - pattern.n, pattern.m)
    return (
        f"warning: sparsity {pattern} keeps {pattern.n} of every {pattern.m} weights here ({100 * pattern.sparsity:g}% sparse, "
        f"NVIDIA's notation); in the Wanda/SparseGPT/OWL repos '{pattern}' prunes {pattern.n} of {pattern.m} "
        f"({100 * flipped.sparsity:g}% sparse), which is {flipped} here"
    )


def check_ratio(value: object, what: str = "sparsity") -> float:
    """A sparsity ratio must be a real number in [0, 1): 1.0 would prune everything."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what}: {value!r} must be a number in [0, 1)")
    if not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{what}: {value} must be in [0, 1)")
    return float(value)


def parse_sparsity(value: object) -> Target:
    """Recipe ``sparsity``: a ratio (0.5) or an N:M string ('2:4')."""
    if isinstance(value, str) and ":" in value:
        return Target.of(pattern=value)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"sparsity: '{value}' must be a number in [0, 1) or an N:M pattern like '2:4'") from None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 60 and 0 < value % 60:
        # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124
        raise ConfigError(
            f"sparsity: {value} must be a number in [0, 1); if you meant the N:M pattern "
            f"{value // 60}:{value % 60}, quote it ('{value // 60}:{value % 60}'): YAML reads unquoted n:m as a base-60 number"
        )
    return Target.of(ratio=value)


def nm_violations(keep: torch.Tensor, pattern: NMPattern) -> int:
    """Number of m-groups (along the input dimension) holding more than n kept weights."""
    rows, cols = keep.shape
    if cols % pattern.m:
        raise ConfigError(f"N:M {pattern} needs the input dimension ({cols}) to be a multiple of {pattern.m}")
    groups = keep.reshape(rows, cols // pattern.m, pattern.m).sum(dim=-1)
    return int((groups > pattern.n).sum())


def block_violations(keep: torch.Tensor, block: BlockShape) -> int:
    """Number of ``block`` tiles of a (out, in) mask that are neither wholly kept nor wholly pruned."""
    rows, cols = keep.shape
    block.check_shape((rows, cols), "the mask")
    kept = keep.reshape(rows // block.rows, block.rows, cols // block.cols, block.cols).sum(dim=(1, 3))
    return int(((kept != 0) & (kept != block.size)).sum())


def realised_sparsity(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


#: how far above an asked ratio a mask's realised sparsity may sit (ties, float rounding); below it only
#: row flooring is allowed (one weight per row, 1/d_in); the host and strataprune.testing share it
REALISED_SLACK = 1e-3


def realised_matches(realised: float, ratio: float, cols: int, tile_fraction: float = 0.0) -> bool:
    """Whether a realised sparsity is the asked ratio: at most 1/d_in below, 1/d_in + REALISED_SLACK above.

    ``tile_fraction`` (block sparsity: one R x C tile over the matrix's size) widens the lower side to
    less than one tile of the matrix, the flooring of a count taken in tiles.
    """
    below = max(1.0 / cols, tile_fraction)
    return ratio - below - 1e-6 <= realised <= ratio + REALISED_SLACK + 1.0 / cols
