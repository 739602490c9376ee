"""Quantized sparse weights: the bitmask index of :mod:`format` over int8 or int4 codes with group scales,
packed from a dense tensor + mask (+ a quantization grid), and ``torch.ops.strataprune.sparse_linear_quantized``.

For ``W`` of shape ``[rows, cols]``, ``group`` columns per scale (32, 64, 128, or ``cols``: one per row),
``ngroups = ceil(cols / group)``, ``nnz`` kept weights (the mask's set bits):

- ``masks``   int16 ``[rows, ceil(cols / 16)]``: bit ``j`` of ``masks[n, g]`` is set iff column ``16 g + j`` of row
  ``n`` is kept (as in format.py);
- ``offsets`` int32 ``[rows + 1]``: ``offsets[n]`` = kept weights in rows ``< n`` (``offsets[rows] = nnz``);
- ``codes``   uint8 ``[ceil(nnz * bits / 8) + 64]``: the kept weights' codes, row by row, columns ascending.
  bits 8: byte ``i`` is the two's-complement int8 ``v_i`` in ``[-127, 127]``; bits 4: code ``i`` is the low nibble of
  byte ``i // 2`` when ``i`` is even, the high nibble when odd, ``q_i`` in ``[0, 15]``. The last 64 bytes are zeros
  (vector loads never leave the buffer);
- ``scales``  float32 ``[rows, ngroups]``; ``zeros`` uint8 ``[rows, ngroups]`` in ``[0, 15]`` (bits 4 only).

Kept ``W[n, k] = scales[n, k // group] * v`` (bits 8) or ``scales[n, k // group] * (q - zeros[n, k // group])``
(bits 4, the joint pruning + INT4 grid of SparseGPT: ``w = scale * (q - zero)``); the others are 0.

The kernels quantize the input on the fly, per token and 128-column block: ``sx = max|x| / 127``,
``xq = round(x / sx)`` (half to even; 0 for an all-zero block), sum ``v * xq`` exactly in int32 over each
unit of ``min(group, 128)`` columns (128 per row scale) and accumulate ``sum * scale * sx`` in fp32.
``quantize_input`` is that input quantization in torch.

Bytes per weight at density ``d``: ``2/16 + d * bits / 8 + ngroups * (4 + [bits 4]) / (rows * cols) + 4 / cols``:
at 70% sparsity, int4 with 128-column groups: 0.125 + 0.15 + 0.039 = 0.31 (fp32 bitmask: 1.34, dense fp32: 4).

1x4 blocks: when every aligned 4-column nibble of every row's mask is all kept or all pruned (``cols % 4 == 0``),
the kernels derive a block index (1 bit per 4 columns, :func:`block_index`; nothing changes on disk) and the
GEMV (1-4 tokens: decode) of the AVX2 and AVX-512 paths expands whole 4-code units instead of single columns, with the same
results bit for bit (:attr:`QuantizedWeight.index_blocks`; :func:`use_block_path` turns it off to compare). A block
pruner's kept blocks may hold weights that are exactly 0 (the dense model's own zeros, or weights quantized onto the
grid's zero); ``pack_int8`` / ``pack_int4`` then keep those zeros as codes (``close_blocks``, at most 1/8 more codes,
the same values), so that the mask stays blocked.

    import torch
    from strataprune.kernels.quantized import pack_int4, sparse_linear_quantized
    w = torch.randn(64, 256) * (torch.rand(64, 256) > 0.7)
    p = pack_int4(w, group_size=64)
    y = sparse_linear_quantized(torch.randn(3, 256), p)     # ~ x @ p.dequantize().T
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ._library import KernelInputError, get_num_threads, isa_index, library
from .format import GROUP, check_tensor, groups_of, mask_words

ACT_BLOCK = 128  #: input columns per activation scale
CODE_PAD = 64  #: zero bytes after the last code
GROUP_SIZES = (32, 64, 128)  #: allowed columns per scale besides one scale per row
#: the quantized kernels' paths, in the order of the library's isa argument (quant_api.cpp)
QUANT_ISA_NAMES = ("portable", "avx2", "avx512", "avx2-novnni")
_STATUS = {
    -1: "the CPU or this build lacks the instruction set (the quantized AVX-512 path needs AVX-512 F/BW/VL/VBMI/VBMI2/VNNI)",
    -2: "a negative size or bits other than 4 and 8",
    -3: "out of memory for the kernel's scratch buffers",
    -4: "masks, offsets and codes disagree (not produced by strataprune.kernels.quantized.pack_*?)",
    -5: "group size must be 32, 64, 128 or the number of columns",
}


# --------------------------------------------------------------------------- library bindings
_bound: dict[str, bool] = {}


def _lib() -> ctypes.CDLL:
    lib = library()
    if not _bound:
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        lib.sq_linear.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, i32, i64, ptr, ptr, i32, i32]
        lib.sq_linear.restype = i32
        lib.sq_validate.argtypes = [ptr, ptr, i64, i64, i32, i64]
        lib.sq_validate.restype = i32
        lib.sq_isa_supported.argtypes = [i32]
        lib.sq_linear_blocks.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i32, i64, ptr, ptr, i32, i32]
        lib.sq_linear_blocks.restype = i32
        lib.sq_block_index_bytes.argtypes = [i64, i64]
        lib.sq_block_index_bytes.restype = i64
        lib.sq_block_index.argtypes = [ptr, i64, i64, ptr]
        lib.sq_block_index.restype = i32
        lib.sq_set_block_path.argtypes = [i32]
        lib.sq_set_block_path.restype = i32
        lib.sq_block_path_calls.argtypes = []
        lib.sq_block_path_calls.restype = i64
        _bound["ok"] = True
    return lib


def quantized_isas() -> list[str]:
    """Paths of the quantized kernels this CPU runs. ``avx2`` uses AVX-VNNI when the CPU has it; then
    ``avx2-novnni`` (the same path with ``vpmaddubsw``) is listed too."""
    lib = _lib()
    names = [name for i, name in enumerate(QUANT_ISA_NAMES[:3]) if lib.sq_isa_supported(i)]
    if "avx2" in names and lib.sq_has_avx_vnni():
        names.insert(names.index("avx2") + 1, "avx2-novnni")
    return names


class _Override:
    index: int | None = None


@contextlib.contextmanager
def use_quantized_isa(name: str) -> Iterator[None]:
    """Force a quantized path (see :func:`quantized_isas`) inside the block; otherwise the package-wide
    ``use_isa``/``set_isa`` choice applies (``auto``: the best)."""
    if name not in quantized_isas():
        raise KernelInputError(f"quantized kernel path {name!r} is not available here; available: {', '.join(quantized_isas())}")
    previous = _Override.index
    _Override.index = QUANT_ISA_NAMES.index(name)
    try:
        yield
    finally:
        _Override.index = previous


_block_path_lock = threading.Lock()
_block_path_off = [0]  # use_block_path(False) blocks open now, in any thread


@contextlib.contextmanager
def use_block_path(enabled: bool) -> Iterator[None]:
    """Inside the block, ``False`` makes the kernels ignore 1x4 block indexes (the bitmask path everywhere, process-wide,
    the native decoder included): to compare the two paths, whose results are the same. The path is off while any
    thread is inside a ``use_block_path(False)`` block (blocks opened by several threads nest by count, not by the
    order they close in); ``True`` changes nothing."""
    if enabled:
        yield
        return
    lib = _lib()
    with _block_path_lock:
        _block_path_off[0] += 1
        lib.sq_set_block_path(0)
    try:
        yield
    finally:
        with _block_path_lock:
            _block_path_off[0] -= 1
            if _block_path_off[0] == 0:
                lib.sq_set_block_path(1)


def block_path_calls() -> int:
    """How many kernel calls (row ranges) took the 1x4 block path so far in this process (tests use it to check
    that a path really reads the block index)."""
    return int(_lib().sq_block_path_calls())


def quantized_isa_index() -> int:
    """The ISA code the quantized kernels are called with: a forced path (tests, `isa=`) or the CPU's best."""
    return _Override.index if _Override.index is not None else isa_index()


def status_message(code: int) -> str:
    return _STATUS.get(code, f"error code {code}")


# --------------------------------------------------------------------------- the format
@dataclass(frozen=True)
class QuantizedWeight:
    """A weight in the quantized sparse format (module docstring); build it with :func:`pack_int8` / :func:`pack_int4`."""

    masks: torch.Tensor
    offsets: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: tuple[int, int]
    bits: int
    group_size: int

    @property
    def nnz(self) -> int:
        return int(self.offsets[-1])

    @property
    def sparsity(self) -> float:
        rows, cols = self.shape
        return 1.0 - self.nnz / (rows * cols) if rows * cols else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes the kernels read: masks, the codes of the nnz weights, offsets, scales and zeros (no padding)."""
        zeros = 0 if self.zeros is None else self.zeros.numel()
        return (
            self.masks.numel() * 2
            + math.ceil(self.nnz * self.bits / 8)
            + self.offsets.numel() * 4
            + self.scales.numel() * 4
            + zeros
        )

    @property
    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 4

    def dequantize(self) -> torch.Tensor:
        """The dense fp32 weight the codes stand for (zeros where the mask bit is clear)."""
        return dequantize(self)

    def validate(self) -> None:
        validate(self)

    @property
    def index_blocks(self) -> bool:
        """Whether the mask is 1x4 blocked, so that the GEMV kernels walk the derived block index (:func:`block_index`)."""
        return block_index(self) is not None

    def __repr__(self) -> str:
        return (
            f"QuantizedWeight(int{self.bits}, shape={self.shape}, group={self.group_size}, nnz={self.nnz}, "
            f"sparsity={self.sparsity:.3f}, bytes/weight={self.nbytes / max(1, self.shape[0] * self.shape[1]):.3f}, "
            f"index={_index_name(self)})"
        )


def _check_weight_and_mask(weight: object, mask: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise KernelInputError(
            f"the weight must be a 2-D tensor, got {type(weight).__name__}"
            + (f" of shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else "")
        )
    if not weight.dtype.is_floating_point or weight.device.type != "cpu":
        raise KernelInputError(f"the weight must be a floating-point CPU tensor, got {weight.dtype} on {weight.device}")
    w = weight.detach().to(torch.float32).contiguous()
    if mask is None:
        keep = w != 0
    else:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(w.shape):
            raise KernelInputError(
                f"mask must be a tensor of the weight's shape {tuple(w.shape)}, got "
                + (f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__)
            )
        keep = mask.detach().to(torch.bool).contiguous()
    if not bool(torch.isfinite(w[keep]).all()):
        raise KernelInputError("the kept weights must be finite (found inf or NaN)")
    return w, keep


def _closed_blocks(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``keep``, or its 1x4 closure (every aligned 4-column block with a kept weight kept whole) where that makes the
    mask 1x4 blocked by adding only exact zeros of ``w``, at most 1/8 of the kept count: a block pruner's output whose
    kept blocks hold a few weights that are exactly 0 (a dense model's own zeros, or weights quantized onto a grid's
    zero) is packed blocked, so the decode kernels take the block path; the values do not change (a zero's code
    stands for exactly 0: int8 code 0, int4 code = the group's zero point)."""
    rows, cols = keep.shape
    if not rows or not cols or cols % 4:
        return keep
    closed = keep.view(rows, cols // 4, 4).any(-1).repeat_interleave(4, dim=1)
    added = closed & ~keep
    count = int(added.sum())
    if count == 0 or 8 * count > int(keep.sum()) or bool((w[added] != 0).any()):
        return keep
    return closed


def _group_of(group_size: int | None, cols: int) -> int:
    if group_size is None:
        return max(1, cols)
    if group_size not in GROUP_SIZES:
        raise KernelInputError(
            f"group_size must be one of {', '.join(map(str, GROUP_SIZES))} or None (one scale per row), got {group_size!r}"
        )
    return group_size


def _per_group(values: torch.Tensor, group: int, ngroups: int) -> torch.Tensor:
    """[rows, cols] -> [rows, ngroups, group] (zero-padded past the last column)."""
    rows, cols = values.shape
    return torch.nn.functional.pad(values, (0, ngroups * group - cols)).view(rows, ngroups, group)


def _grid(name: str, grid: torch.Tensor, rows: int, ngroups: int) -> torch.Tensor:
    if not isinstance(grid, torch.Tensor) or tuple(grid.shape) != (rows, ngroups):
        raise KernelInputError(
            f"{name} must be a tensor of shape ({rows}, {ngroups}) = (rows, ceil(cols / group)), got "
            + (f"shape {tuple(grid.shape)}" if isinstance(grid, torch.Tensor) else type(grid).__name__)
        )
    return grid.detach().to(torch.float32).contiguous()


def _assemble(
    keep: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group: int
) -> QuantizedWeight:
    rows, cols = keep.shape
    counts = keep.sum(1, dtype=torch.int64)
    nnz = int(counts.sum())
    if nnz >= 2**31:
        raise KernelInputError(f"a weight of {nnz} kept values is too large for the format's 32-bit offsets (< 2**31)")
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    kept = codes[keep].to(torch.int32)  # row-major order: row by row, columns ascending
    if bits == 8:
        body = (kept & 0xFF).to(torch.uint8)
    else:
        if kept.numel() % 2:
            kept = torch.cat([kept, torch.zeros(1, dtype=torch.int32)])
        body = (kept[0::2] | (kept[1::2] << 4)).to(torch.uint8)
    packed_codes = torch.cat([body, torch.zeros(CODE_PAD, dtype=torch.uint8)])
    return QuantizedWeight(
        mask_words(keep),
        offsets,
        packed_codes,
        scales.contiguous(),
        None if zeros is None else zeros.contiguous(),
        (rows, cols),
        bits,
        group,
    )


def pack_int8(
    weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    group_size: int | None = None,
    scales: torch.Tensor | None = None,
    close_blocks: bool = True,
) -> QuantizedWeight:
    """int8 codes with symmetric scales: ``v = clamp(round(w / scale), -127, 127)``.

    ``mask``: the kept weights (default ``weight != 0``); ``group_size``: 32, 64, 128 or None (one scale per row);
    ``scales``: ``[rows, ngroups]`` to use (default: max |kept w| / 127 per group). ``close_blocks``: a mask that is
    1x4 blocked but for a few exact zeros inside kept blocks is packed blocked, those zeros stored as codes (values
    unchanged; at most 1/8 more codes; see the module docstring).
    """
    w, keep = _check_weight_and_mask(weight, mask)
    if close_blocks:
        keep = _closed_blocks(w, keep)
    rows, cols = w.shape
    group = _group_of(group_size, cols)
    ngroups = -(-cols // group) if cols else 0
    if scales is None:
        amax = _per_group(torch.where(keep, w.abs(), 0.0), group, ngroups).amax(-1) if cols else torch.zeros(rows, 0)
        scales = amax / 127
    else:
        scales = _grid("scales", scales, rows, ngroups)
    expanded = scales.repeat_interleave(group, dim=1)[:, :cols]
    safe = torch.where(expanded > 0, expanded, 1.0)
    codes = torch.where(expanded > 0, torch.round(w / safe), 0.0).clamp(-127, 127)
    return _assemble(keep, codes, scales, None, 8, group)


def pack_int4(
    weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    group_size: int | None = 128,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    close_blocks: bool = True,
) -> QuantizedWeight:
    """int4 codes on an asymmetric grid ``w = scale * (q - zero)``, ``q`` in [0, 15].

    ``scales``/``zeros`` (``[rows, ngroups]``, e.g. the joint pruning + INT4 grid a SparseGPT run records,
    ``zero`` an integer in [0, 15]) are used as given, ``q = clamp(round(w / scale + zero), 0, 15)``; without
    them the min-max grid of each group's kept weights (0 included) is computed. ``close_blocks``: as in
    :func:`pack_int8` (0 is on every grid: ``q = zero``).
    """
    w, keep = _check_weight_and_mask(weight, mask)
    if close_blocks:
        keep = _closed_blocks(w, keep)
    rows, cols = w.shape
    group = _group_of(group_size, cols)
    ngroups = -(-cols // group) if cols else 0
    if (scales is None) != (zeros is None):
        raise KernelInputError("give both scales and zeros (the INT4 grid), or neither")
    if scales is None:
        kept = _per_group(torch.where(keep, w, 0.0), group, ngroups)
        low, high = kept.amin(-1).clamp(max=0), kept.amax(-1).clamp(min=0)
        flat = (low == 0) & (high == 0)
        low, high = torch.where(flat, -1.0, low), torch.where(flat, 1.0, high)
        scales = (high - low) / 15
        zeros_f = torch.round(-low / scales).clamp(0, 15)
    else:
        scales = _grid("scales", scales, rows, ngroups)
        zeros_f = _grid("zeros", zeros, rows, ngroups)
        if not bool((zeros_f == zeros_f.round()).all() & (zeros_f >= 0).all() & (zeros_f <= 15).all()):
            raise KernelInputError("zeros must be integers in [0, 15] (an INT4 grid's zero points)")
        if not bool((scales > 0).all()):
            raise KernelInputError("scales must be positive")
    s = scales.repeat_interleave(group, dim=1)[:, :cols]
    z = zeros_f.repeat_interleave(group, dim=1)[:, :cols]
    codes = torch.round(w / s + z).clamp(0, 15)
    return _assemble(keep, codes, scales, zeros_f.to(torch.uint8), 4, group)


def pack_from_grid(weight: torch.Tensor, quant: dict) -> QuantizedWeight:
    """Pack a jointly pruned + quantized weight with the grid record a pruner saved
    (``{"bits": 4, "groupsize": G or None, "scale": [rows, ngroups], "zero": [rows, ngroups], ...}``)."""
    if not isinstance(quant, dict) or quant.get("bits") != 4:
        got = quant.get("bits") if isinstance(quant, dict) else quant
        raise KernelInputError(f"pack_from_grid takes a 4-bit grid record, got bits={got!r}")
    return pack_int4(weight, None, quant.get("groupsize"), quant["scale"], quant["zero"])


def _kept_mask(masks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    words = masks.to(torch.int32) & 0xFFFF
    keep = ((words.unsqueeze(-1) >> torch.arange(GROUP, dtype=torch.int32)) & 1).bool()
    return keep.view(rows, groups_of(cols) * GROUP)[:, :cols]


def code_values(packed: QuantizedWeight) -> torch.Tensor:
    """The nnz codes as int32 (v for bits 8, q for bits 4), in storage order."""
    nnz = packed.nnz
    raw = packed.codes.to(torch.int32)
    if packed.bits == 8:
        return torch.where(raw[:nnz] >= 128, raw[:nnz] - 256, raw[:nnz])
    return torch.stack([raw & 0x0F, raw >> 4], dim=1).flatten()[:nnz]


def dequantize(packed: QuantizedWeight) -> torch.Tensor:
    rows, cols = packed.shape
    keep = _kept_mask(packed.masks, rows, cols)
    values = code_values(packed).to(torch.float32)
    s = packed.scales.repeat_interleave(packed.group_size, dim=1)[:, :cols]
    dense = torch.zeros(rows, cols, dtype=torch.float32)
    if packed.bits == 8:
        dense[keep] = values * s[keep]
    else:
        z = packed.zeros.to(torch.float32).repeat_interleave(packed.group_size, dim=1)[:, :cols]
        dense[keep] = s[keep] * (values - z[keep])
    return dense


def validate(packed: QuantizedWeight) -> None:
    """KernelInputError unless every buffer has its dtype and shape and masks, offsets and codes agree."""
    check(packed.masks, packed.offsets, packed.codes, packed.scales, packed.zeros, packed.shape, packed.bits, packed.group_size)


def check(masks, offsets, codes, scales, zeros, shape: tuple[int, int], bits: int, group_size: int) -> None:
    rows, cols = shape
    if bits not in (4, 8):
        raise KernelInputError(f"bits must be 4 or 8, got {bits!r}")
    if not (group_size in GROUP_SIZES or (group_size == cols and cols > 0)) and rows * cols:
        raise KernelInputError(f"group_size must be 32, 64, 128 or in_features ({cols}), got {group_size!r}")
    ngroups = -(-cols // group_size) if cols and group_size else 0
    check_tensor("masks", masks, torch.int16, (rows, groups_of(cols)))
    check_tensor("offsets", offsets, torch.int32, (rows + 1,))
    check_tensor("codes", codes, torch.uint8, None, dims=1)
    check_tensor("scales", scales, torch.float32, (rows, ngroups))
    if bits == 4:
        check_tensor("zeros", zeros, torch.uint8, (rows, ngroups))
        if zeros.numel() and int(zeros.max()) > 15:
            raise KernelInputError(f"zeros must be in [0, 15], got a maximum of {int(zeros.max())}")
    elif zeros is not None:
        raise KernelInputError("int8 weights have no zeros (symmetric scales): pass None")
    code = _lib().sq_validate(masks.data_ptr(), offsets.data_ptr(), rows, cols, bits, codes.numel())
    if code:
        raise KernelInputError(f"inconsistent quantized weight of shape {tuple(shape)}: {status_message(code)}")


# --------------------------------------------------------------------------- the op
_validated: dict[int, tuple[weakref.ref, tuple]] = {}


def _ensure_consistent(masks, offsets, codes, scales, zeros, shape, bits, group_size) -> None:
    key = (
        id(offsets),
        id(codes),
        id(scales),
        id(zeros),
        masks._version,
        offsets._version,
        codes._version,
        -1 if zeros is None else zeros._version,
        codes.numel(),
        shape,
        bits,
        group_size,
    )
    entry = _validated.get(id(masks))
    if entry is not None and entry[0]() is masks and entry[1] == key:
        return
    check(masks, offsets, codes, scales, zeros, shape, bits, group_size)
    ident = id(masks)
    _validated[ident] = (weakref.ref(masks, lambda _ref: _validated.pop(ident, None)), key)


_block_indexes: dict[int, tuple[weakref.ref, tuple, torch.Tensor | None]] = {}


_block_indexes_lock = threading.Lock()  # two threads deriving one weight's index must not free each other's


def _block_index_of(masks: torch.Tensor, rows: int, cols: int) -> torch.Tensor | None:
    """The block index of validated masks, derived once per masks tensor (and again after an in-place change)."""
    with _block_indexes_lock:
        return _derive_block_index(masks, rows, cols)


def _derive_block_index(masks: torch.Tensor, rows: int, cols: int) -> torch.Tensor | None:
    key = (masks._version, masks.data_ptr(), rows, cols)
    ident = id(masks)
    entry = _block_indexes.get(ident)
    if entry is not None and entry[0]() is masks and entry[1] == key:
        return entry[2]
    lib = _lib()
    index = None
    if lib.sq_block_index(masks.data_ptr(), rows, cols, None):
        index = torch.zeros(int(lib.sq_block_index_bytes(rows, cols)), dtype=torch.uint8)
        lib.sq_block_index(masks.data_ptr(), rows, cols, index.data_ptr())
        index = index.view(rows, -1)
    _block_indexes[ident] = (weakref.ref(masks, lambda _ref: _block_indexes.pop(ident, None)), key, index)
    return index


def _index_name(packed: QuantizedWeight) -> str:
    try:
        return "1x4 blocks" if packed.index_blocks else "bitmask"
    except KernelInputError:  # a repr must not raise: the inconsistency is reported where the weight is used
        return "invalid"


def block_index(packed: QuantizedWeight) -> torch.Tensor | None:
    """The 1x4 block index the kernels derive from ``packed``'s mask, or None when the mask is not 1x4 blocked.

    uint8 ``[rows, stride]`` (``stride`` = 8 bytes per 256 columns): bit ``i`` of byte ``b`` of row ``n`` is set iff
    columns ``32 b + 4 i`` to ``32 b + 4 i + 3`` of row ``n`` are kept. Derived once per masks tensor and kept beside
    it (1/32 byte per weight, rows padded to 8 bytes per 256 columns); the codes and scales are used where they are.
    Returns a copy."""
    validate(packed)
    index = _block_index_of(packed.masks, *packed.shape)
    return None if index is None else index.clone()  # the kernels read the original: a caller's edit must not reach them


def linear(
    x: torch.Tensor,
    masks: torch.Tensor,
    offsets: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    in_features: int,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """The eager implementation: every check, then one ``sq_linear`` call."""
    lib = _lib()
    if not isinstance(x, torch.Tensor):
        raise KernelInputError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise KernelInputError(f"x must have {in_features} features in its last dimension, got shape {tuple(x.shape)}")
    check_tensor("x", x, torch.float32, None)
    if not isinstance(masks, torch.Tensor) or masks.dim() != 2:
        raise KernelInputError(f"masks must be a 2-D int16 tensor [out_features, ceil(in_features / 16)], got {masks!r:.80}")
    rows = masks.shape[0]
    if bias is not None:
        check_tensor("bias", bias, torch.float32, (rows,))
    _ensure_consistent(masks, offsets, codes, scales, zeros, (rows, in_features), bits, group_size)
    tokens = x.numel() // in_features if in_features else math.prod(x.shape[:-1])
    y = torch.empty(*x.shape[:-1], rows, dtype=torch.float32)
    blocks = _block_index_of(masks, rows, in_features)  # the GEMV (1-4 tokens) takes it, the GEMM not
    code = lib.sq_linear_blocks(
        x.data_ptr(),
        tokens,
        masks.data_ptr(),
        offsets.data_ptr(),
        codes.data_ptr(),
        scales.data_ptr(),
        None if zeros is None else zeros.data_ptr(),
        None if blocks is None else blocks.data_ptr(),
        rows,
        in_features,
        bits,
        group_size,
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        quantized_isa_index(),
        get_num_threads(),
    )
    if code:
        raise KernelInputError(f"sparse_linear_quantized failed: {status_message(code)}")
    return y


def pointers(packed: QuantizedWeight, bias: torch.Tensor | None = None) -> tuple:
    """The validated weight's data pointers and sizes for :func:`launch_pointers` (the caller keeps ``packed``
    and ``bias`` alive and unmodified while they are used; the block index lives as long as ``packed.masks``)."""
    validate(packed)
    blocks = _block_index_of(packed.masks, *packed.shape)  # the kept index itself: its pointer must outlive this call
    if bias is not None:
        check_tensor("bias", bias, torch.float32, (packed.shape[0],))
    return (
        packed.masks.data_ptr(),
        packed.offsets.data_ptr(),
        packed.codes.data_ptr(),
        packed.scales.data_ptr(),
        None if packed.zeros is None else packed.zeros.data_ptr(),
        None if bias is None else bias.data_ptr(),
        packed.shape[0],
        packed.shape[1],
        packed.bits,
        packed.group_size,
        None if blocks is None else blocks.data_ptr(),
    )


def launch_pointers(x: torch.Tensor, ptrs: tuple) -> torch.Tensor:
    """One ``sq_linear`` call on a contiguous float32 CPU ``x`` and :func:`pointers` (no per-call checks of the
    weight: the path for modules and benchmarks, where dispatcher and validation would cost more than the matmul)."""
    masks, offsets, codes, scales, zeros, bias, rows, cols, bits, group_size, blocks = ptrs
    tokens = x.numel() // cols if cols else math.prod(x.shape[:-1])
    y = torch.empty(*x.shape[:-1], rows, dtype=torch.float32)
    code = _lib().sq_linear_blocks(
        x.data_ptr(),
        tokens,
        masks,
        offsets,
        codes,
        scales,
        zeros,
        blocks,
        rows,
        cols,
        bits,
        group_size,
        bias,
        y.data_ptr(),
        quantized_isa_index(),
        get_num_threads(),
    )
    if code:
        raise KernelInputError(f"sparse_linear_quantized failed: {status_message(code)}")
    return y


@torch.library.custom_op("strataprune::sparse_linear_quantized", mutates_args=())
def sparse_linear_quantized_op(
    x: torch.Tensor,
    masks: torch.Tensor,
    offsets: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    in_features: int,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    return linear(x, masks, offsets, codes, scales, zeros, bias, in_features, bits, group_size)


@sparse_linear_quantized_op.register_fake
def _fake(x, masks, offsets, codes, scales, zeros, bias, in_features, bits, group_size):
    torch._check(x.shape[-1] == in_features, lambda: f"x must have {in_features} features, got {tuple(x.shape)}")
    return x.new_empty((*x.shape[:-1], masks.shape[0]))


def sparse_linear_quantized(x: torch.Tensor, packed: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for a :class:`QuantizedWeight` (input quantized on the fly; see the module docstring)."""
    if not isinstance(packed, QuantizedWeight):
        raise KernelInputError(f"packed must be a QuantizedWeight (pack_int8 / pack_int4), got {type(packed).__name__}")
    return torch.ops.strataprune.sparse_linear_quantized(
        x,
        packed.masks,
        packed.offsets,
        packed.codes,
        packed.scales,
        packed.zeros,
        bias,
        packed.shape[1],
        packed.bits,
        packed.group_size,
    )


def quantize_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation quantization in torch: ``(xq, sx)`` with ``x ~ xq * sx`` per 128-column block
    (``xq`` float32 holding integers in [-127, 127], ``sx`` ``[..., ceil(cols / 128)]``)."""
    cols = x.shape[-1]
    blocks = -(-cols // ACT_BLOCK)
    padded = torch.nn.functional.pad(x.to(torch.float32), (0, blocks * ACT_BLOCK - cols)).view(*x.shape[:-1], blocks, ACT_BLOCK)
    sx = padded.abs().amax(-1) / 127
    safe = torch.where(sx > 0, sx, 1.0).unsqueeze(-1)
    xq = torch.where(sx.unsqueeze(-1) > 0, torch.round(padded / safe), 0.0).clamp(-127, 127)
    return xq.flatten(-2)[..., :cols], sx


class QuantizedSparseLinear(torch.nn.Module):
    """``y = x W^T + b`` with ``W`` in the quantized sparse format, stored as buffers (``masks``, ``offsets``,
    ``codes``, ``scales``, ``zeros`` for int4, ``bias``) that ``state_dict`` saves and loading validates.

    Inference only; float32 CPU input of any leading shape. Eager calls go straight to the library with the
    buffers' pointers (re-checked only when a buffer is replaced or modified); tracing uses the op.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int | None = 128, bias: bool = True):
        super().__init__()
        if bits not in (4, 8):
            raise KernelInputError(f"bits must be 4 or 8, got {bits!r}")
        self.in_features, self.out_features, self.bits = int(in_features), int(out_features), bits
        self.group_size = _group_of(group_size, self.in_features)
        ngroups = -(-self.in_features // self.group_size) if self.in_features else 0
        self.register_buffer("masks", torch.zeros(out_features, groups_of(in_features), dtype=torch.int16))
        self.register_buffer("offsets", torch.zeros(out_features + 1, dtype=torch.int32))
        self.register_buffer("codes", torch.zeros(CODE_PAD, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, ngroups, dtype=torch.float32))
        self.register_buffer("zeros", torch.zeros(out_features, ngroups, dtype=torch.uint8) if bits == 4 else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)
        self.register_load_state_dict_post_hook(QuantizedSparseLinear._check_loaded)
        self._checked: tuple = ()

    @classmethod
    def from_packed(cls, packed: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantizedSparseLinear:
        rows, cols = packed.shape
        module = cls(cols, rows, packed.bits, None if packed.group_size == cols else packed.group_size, bias is not None)
        module.masks, module.offsets, module.codes, module.scales = packed.masks, packed.offsets, packed.codes, packed.scales
        module.zeros = packed.zeros
        if bias is not None:
            module.bias = bias.detach().to(torch.float32).contiguous().clone()
        module.packed.validate()
        return module

    @classmethod
    def from_dense(cls, linear: torch.nn.Linear, bits: int = 4, group_size: int | None = 128) -> QuantizedSparseLinear:
        """Quantize ``linear``'s kept weights (its nonzeros) with :func:`pack_int4` / :func:`pack_int8`'s default grids."""
        if not isinstance(linear, torch.nn.Linear):
            raise KernelInputError(f"from_dense needs an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        packed = pack_int4(weight, group_size=group_size) if bits == 4 else pack_int8(weight, group_size=group_size)
        return cls.from_packed(packed, None if linear.bias is None else linear.bias.detach())

    @property
    def packed(self) -> QuantizedWeight:
        return QuantizedWeight(
            self.masks,
            self.offsets,
            self.codes,
            self.scales,
            self.zeros,
            (self.out_features, self.in_features),
            self.bits,
            self.group_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and not x.is_contiguous():
            x = x.contiguous()
        if type(x) is torch.Tensor and not x.requires_grad and not torch.compiler.is_compiling():
            if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() == 0 or x.shape[-1] != self.in_features:
                linear(
                    x,
                    self.masks,
                    self.offsets,
                    self.codes,
                    self.scales,
                    self.zeros,
                    self.bias,
                    self.in_features,
                    self.bits,
                    self.group_size,
                )  # raises, naming the problem
            buffers = (self.masks, self.offsets, self.codes, self.scales, self.zeros, self.bias)
            versions = tuple(-1 if b is None else b._version for b in buffers)
            if not self._checked or any(a is not b for a, b in zip(self._checked[0], buffers)) or self._checked[1] != versions:
                self._checked = (buffers, versions, pointers(self.packed, self.bias))
            return launch_pointers(x, self._checked[2])
        return torch.ops.strataprune.sparse_linear_quantized(
            x,
            self.masks,
            self.offsets,
            self.codes,
            self.scales,
            self.zeros,
            self.bias,
            self.in_features,
            self.bits,
            self.group_size,
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # the number of code bytes depends on the weight: take the incoming size instead of failing on a mismatch
        key = prefix + "codes"
        if key in state_dict and isinstance(state_dict[key], torch.Tensor):
            self.codes = torch.empty_like(state_dict[key], dtype=torch.uint8)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @staticmethod
    def _check_loaded(module: torch.nn.Module, incompatible_keys: object) -> None:
        module.packed.validate()

    def extra_repr(self) -> str:
        p = self.packed
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, group={self.group_size}, "
            f"bias={self.bias is not None}, sparsity={p.sparsity:.3f}, "
            f"bytes/weight={p.nbytes / max(1, p.shape[0] * p.shape[1]):.3f}, index={_index_name(p)}"
        )
