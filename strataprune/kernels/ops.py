"""``torch.ops.strataprune.sparse_linear``: y = x W^T + b with W in the packed format, on the C kernels.

A ``torch.library`` custom op, so ``torch.compile`` and ``torch.export`` trace it as one opaque node
(its fake implementation gives the output shape) and eager calls dispatch straight to ctypes on the
tensors' data pointers. Inference only (no autograd formula).

    import torch
    from strataprune.kernels import pack, sparse_linear
    w = torch.randn(64, 40) * (torch.rand(64, 40) > 0.7)
    p = pack(w)
    y = sparse_linear(torch.randn(3, 40), p)          # == torch.randn(3, 40) @ w.T up to rounding

Every input is checked before the C code runs (dtype float32, CPU, contiguous, matching shapes), and
masks/offsets are checked for consistency once per buffer version, so a bad call is a
``KernelInputError``, never a crash of the process.
"""

from __future__ import annotations

import math
import weakref

import torch

from ._library import KernelInputError, get_num_threads, isa_index, library, status_message
from .format import PackedWeight, check_tensor, chunks_of, groups_of, validate

# packed buffers already checked by sp_validate: id(masks) -> (weak reference to masks, what was checked)
_validated: dict[int, tuple[weakref.ref, tuple]] = {}


def _ensure_consistent(masks: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, shape: tuple[int, int]) -> None:
    key = (id(offsets), masks._version, offsets._version, values.numel(), shape)
    entry = _validated.get(id(masks))
    if entry is not None and entry[0]() is masks and entry[1] == key:
        return
    validate(masks, values, offsets, shape)
    ident = id(masks)
    _validated[ident] = (weakref.ref(masks, lambda _ref: _validated.pop(ident, None)), key)


def check_input(x: object, in_features: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise KernelInputError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise KernelInputError(f"x must have {in_features} features in its last dimension, got shape {tuple(x.shape)}")
    check_tensor("x", x, torch.float32, None)


def check_weight(masks: object, values: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None, in_features: int) -> int:
    """Dtypes, shapes, layout and consistency of a packed weight (and bias); returns out_features."""
    if not isinstance(masks, torch.Tensor) or masks.dim() != 2:
        raise KernelInputError(f"masks must be a 2-D int16 tensor [out_features, ceil(in_features / 16)], got {masks!r:.80}")
    rows = masks.shape[0]
    check_tensor("masks", masks, torch.int16, (rows, groups_of(in_features)))
    check_tensor("offsets", offsets, torch.int32, (rows * chunks_of(in_features) + 1,))
    check_tensor("values", values, torch.float32, None, dims=1)
    if bias is not None:
        check_tensor("bias", bias, torch.float32, (rows,))
    _ensure_consistent(masks, values, offsets, (rows, in_features))
    return rows


def launch(
    x: torch.Tensor,
    masks: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    rows: int,
    in_features: int,
) -> torch.Tensor:
    """One ``sp_linear`` call on already checked tensors (``x`` contiguous float32 CPU ``[..., in_features]``)."""
    pointers = (masks.data_ptr(), values.data_ptr(), offsets.data_ptr(), None if bias is None else bias.data_ptr())
    return launch_pointers(x, pointers, rows, in_features)


def launch_pointers(x: torch.Tensor, pointers: tuple[int, int, int, int | None], rows: int, in_features: int) -> torch.Tensor:
    """``launch`` with the packed weight's data pointers (masks, values, offsets, bias or None) taken beforehand."""
    tokens = x.numel() // in_features if in_features else math.prod(x.shape[:-1])
    y = torch.empty(*x.shape[:-1], rows, dtype=torch.float32)
    masks, values, offsets, bias = pointers
    code = library().sp_linear(
        x.data_ptr(), tokens, masks, values, offsets, rows, in_features, bias, y.data_ptr(), isa_index(), get_num_threads()
    )
    if code:
        raise KernelInputError(f"sparse_linear failed: {status_message(code)}")
    return y


def linear(
    x: torch.Tensor, masks: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None, in_features: int
) -> torch.Tensor:
    """The eager implementation: every check, then one ``sp_linear`` call. ``x``: ``[..., in_features]``."""
    library()
    check_input(x, in_features)
    rows = check_weight(masks, values, offsets, bias, in_features)
    return launch(x, masks, values, offsets, bias, rows, in_features)


@torch.library.custom_op("strataprune::sparse_linear", mutates_args=())
def sparse_linear_op(
    x: torch.Tensor, masks: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None, in_features: int
) -> torch.Tensor:
    return linear(x, masks, values, offsets, bias, in_features)


@sparse_linear_op.register_fake
def _sparse_linear_fake(x, masks, values, offsets, bias, in_features):
    torch._check(x.shape[-1] == in_features, lambda: f"x must have {in_features} features, got {tuple(x.shape)}")
    return x.new_empty((*x.shape[:-1], masks.shape[0]))


def sparse_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for a :class:`PackedWeight` ``W``, through the custom op."""
    if not isinstance(packed, PackedWeight):
        raise KernelInputError(f"packed must be a PackedWeight (strataprune.kernels.pack), got {type(packed).__name__}")
    return torch.ops.strataprune.sparse_linear(x, packed.masks, packed.values, packed.offsets, bias, packed.shape[1])
