"""The compressed weight format of the CPU sparse kernels: a 16-bit mask per 16 weights, the nonzero
values packed row by row, and an offset per (row, 256-column chunk).

For a Linear weight ``W`` of shape ``[rows, cols]`` (fp32):

- ``masks``   int16 ``[rows, ceil(cols / 16)]``: bit ``j`` of ``masks[n, g]`` is set iff ``W[n, 16 g + j] != 0``
  (stored as int16 because torch has no general uint16; the kernels read the bits as uint16);
- ``values``  float32 ``[nnz]``: the nonzeros in row-major order (row by row, columns ascending);
- ``offsets`` int32 ``[rows * ceil(cols / 256) + 1]``: entry ``n * chunks + c`` is the index in ``values``
  of the first nonzero of row ``n`` at or after column ``256 c``; the last entry is ``nnz``.

Bytes per weight at density ``d`` (fraction of nonzeros): ``2/16 + 4 d + 4/256 = 0.1406 + 4 d``, i.e.
0.535 of dense fp32 at 50% sparsity, 0.335 at 70%, 0.235 at 80%, 0.135 at 90%. A weight that is
``-0.0`` counts as zero (unpack gives ``+0.0``); NaN counts as nonzero.

    python -c "import torch; from strataprune.kernels import pack; p = pack(torch.randn(8, 40)); print(p, p.unpack().shape)"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._library import KernelInputError, library, status_message

GROUP = 16  #: columns per mask word
CHUNK = 256  #: columns per offsets entry


def groups_of(cols: int) -> int:
    return -(-cols // GROUP)


def chunks_of(cols: int) -> int:
    return -(-cols // CHUNK)


@dataclass(frozen=True)
class PackedWeight:
    """A weight in the kernels' format (see the module docstring); build it with :func:`pack`."""

    masks: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.offsets[-1])

    @property
    def sparsity(self) -> float:
        rows, cols = self.shape
        return 1.0 - self.nnz / (rows * cols) if rows * cols else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes the kernels read for this weight (masks + the nnz values + offsets)."""
        return self.masks.numel() * 2 + self.nnz * 4 + self.offsets.numel() * 4

    @property
    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 4

    def unpack(self) -> torch.Tensor:
        """The dense fp32 weight, exactly (``-0.0`` comes back as ``+0.0``)."""
        return unpack(self)

    def validate(self) -> None:
        """KernelInputError unless masks, offsets and values are consistent (cheap, O(rows x cols / 16))."""
        validate(self.masks, self.values, self.offsets, self.shape)

    def __repr__(self) -> str:
        return (
            f"PackedWeight(shape={self.shape}, nnz={self.nnz}, sparsity={self.sparsity:.3f}, "
            f"bytes={self.nbytes} = {self.nbytes / max(1, self.dense_nbytes):.3f} of dense fp32)"
        )


def pack(weight: torch.Tensor) -> PackedWeight:
    """Compress a 2-D float32 CPU weight (any sparsity, any shape) into the kernels' format."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise KernelInputError(f"pack needs a 2-D weight tensor, got {_describe(weight)}")
    if weight.dtype != torch.float32:
        raise KernelInputError(f"pack needs a float32 weight, got {weight.dtype}; convert with .float() first")
    if weight.device.type != "cpu":
        raise KernelInputError(f"pack needs a CPU weight, got one on {weight.device}")
    rows, cols = weight.shape
    w = weight.detach().contiguous()
    nonzero = w != 0
    chunks = chunks_of(cols)
    masks = mask_words(nonzero)
    per_chunk = torch.nn.functional.pad(nonzero, (0, chunks * CHUNK - cols)).view(rows, chunks, CHUNK).sum(-1, dtype=torch.int64)
    ends = per_chunk.flatten().cumsum(0)
    nnz = int(ends[-1]) if ends.numel() else 0
    if nnz >= 2**31:
        raise KernelInputError(f"a weight of {nnz} nonzeros is too large for the format's 32-bit offsets (< 2**31)")
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), ends]).to(torch.int32)
    values = w[nonzero].contiguous()
    return PackedWeight(masks.contiguous(), values, offsets, (rows, cols))


def mask_words(keep: torch.Tensor) -> torch.Tensor:
    """bool ``[rows, cols]`` -> the format's int16 ``[rows, ceil(cols / 16)]`` mask words (bit j: column 16 g + j)."""
    rows, cols = keep.shape
    groups = groups_of(cols)
    bits = torch.nn.functional.pad(keep, (0, groups * GROUP - cols)).view(rows, groups, GROUP).to(torch.int32)
    words = (bits << torch.arange(GROUP, dtype=torch.int32)).sum(-1, dtype=torch.int32)
    return torch.where(words >= 1 << 15, words - (1 << 16), words).to(torch.int16).contiguous()


def unpack(packed: PackedWeight) -> torch.Tensor:
    rows, cols = packed.shape
    words = packed.masks.to(torch.int32) & 0xFFFF
    nonzero = ((words.unsqueeze(-1) >> torch.arange(GROUP, dtype=torch.int32)) & 1).bool()
    nonzero = nonzero.view(rows, groups_of(cols) * GROUP)[:, :cols]
    dense = torch.zeros(rows, cols, dtype=torch.float32)
    dense[nonzero] = packed.values[: packed.nnz]
    return dense


def validate(masks: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, shape: tuple[int, int]) -> None:
    """Dtypes, shapes, layout and the consistency of masks with offsets (the kernels trust both)."""
    rows, cols = shape
    check_tensor("masks", masks, torch.int16, (rows, groups_of(cols)))
    check_tensor("offsets", offsets, torch.int32, (rows * chunks_of(cols) + 1,))
    check_tensor("values", values, torch.float32, None, dims=1)
    code = library().sp_validate(masks.data_ptr(), offsets.data_ptr(), rows, cols, values.numel())
    if code:
        raise KernelInputError(f"inconsistent packed weight of shape {tuple(shape)}: {status_message(code)}")


def check_tensor(name: str, tensor: object, dtype: torch.dtype, shape: tuple[int, ...] | None, dims: int | None = None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != dtype:
        raise KernelInputError(f"{name} must be {dtype}, got {tensor.dtype}")
    if tensor.device.type != "cpu":
        raise KernelInputError(f"{name} must be on the CPU, got {tensor.device}")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise KernelInputError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if dims is not None and tensor.dim() != dims:
        raise KernelInputError(f"{name} must be {dims}-D, got shape {tuple(tensor.shape)}")
    if not tensor.is_contiguous():
        raise KernelInputError(f"{name} must be contiguous (call .contiguous()), got strides {tensor.stride()}")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-D tensor of shape {tuple(value.shape)}"
    return type(value).__name__
