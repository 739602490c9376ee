"""The 1x4 block path of the quantized kernels (strataprune/kernels/quantized.py, "1x4 blocks"): when every aligned
4-column nibble of every row's mask is all kept or all pruned, the kernels derive a block index and the GEMV (1-4
tokens) of the AVX2 (with and without AVX-VNNI) and AVX-512 paths walks it.

References: (1) the same packed weight through the bitmask path (block path off): the results must be bit-identical,
since both paths sum the same products exactly per int32 lane and accumulate them in the same fp32 order; (2) a plain
Python loop from the format's definition (per 128-column input block quantization, exact integer sums per unit,
fp32 rounding bound as in test_kernels_quantized.py); (3) the block index itself against bits read from the dense mask.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from strataprune import kernels

pytestmark = [
    pytest.mark.skipif(not kernels.available(), reason=f"kernels not built: {kernels.available().reason}"),
    pytest.mark.usefixtures("one_thread"),
]

if kernels.available():
    from strataprune.kernels import quantized as Q

EPS32 = float(np.finfo(np.float32).eps)
VECTOR_PATHS = ("avx2", "avx2-novnni", "avx512")


def blocked_weight(rows: int, cols: int, sparsity: float, seed: int) -> torch.Tensor:
    """Random weights kept or pruned in aligned runs of 4 columns, with an empty and a full row."""
    g = torch.Generator().manual_seed(seed)
    keep = (torch.rand(rows, -(-cols // 4), generator=g) >= sparsity).repeat_interleave(4, dim=1)[:, :cols]
    w = torch.randn(rows, cols, generator=g) * keep
    if rows >= 3:
        w[1] = 0
        w[2] = torch.randn(cols, generator=g).abs() + 0.1
    return w


def pack(w: torch.Tensor, bits: int, group: int | None):
    return Q.pack_int8(w, group_size=group) if bits == 8 else Q.pack_int4(w, group_size=group)


def require(path: str) -> None:
    if path not in Q.quantized_isas():
        pytest.skip(f"{path}: not on this CPU (quantized paths here: {Q.quantized_isas()})")


def run(p, x: torch.Tensor, bias: torch.Tensor | None, path: str, blocks: bool) -> torch.Tensor:
    with Q.use_quantized_isa(path), Q.use_block_path(blocks):
        return Q.sparse_linear_quantized(x, p, bias)


def loop_reference(p, x: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(y, bound) for one token from the packed buffers with plain loops over the dense columns: column k of row n is
    kept iff mask bit k % 16 of word k // 16 is set; kept codes come in storage order."""
    rows, cols = p.shape
    masks = p.masks.numpy().astype(np.int64) & 0xFFFF
    offsets, codes, scales = p.offsets.numpy(), p.codes.numpy(), p.scales.numpy()
    zeros = None if p.zeros is None else p.zeros.numpy()
    group = p.group_size
    unit = 128 if group == cols else min(group, 128)
    xq = np.zeros(cols, dtype=np.int64)
    sx = np.zeros(-(-cols // 128), dtype=np.float32)
    for b in range(sx.size):
        amax = np.float32(0)
        for k in range(128 * b, min(cols, 128 * b + 128)):
            amax = max(amax, np.float32(abs(x[k])))
        sx[b] = np.float32(amax / np.float32(127))
        for k in range(128 * b, min(cols, 128 * b + 128)):
            xq[k] = 0 if sx[b] == 0 else int(np.clip(np.rint(np.float32(x[k]) / sx[b]), -127, 127))
    y, bound = np.zeros(rows), np.zeros(rows)
    for n in range(rows):
        i, sums, magnitude = int(offsets[n]), {}, 0.0
        for k in range(cols):
            if not masks[n, k // 16] >> (k % 16) & 1:
                continue
            if p.bits == 8:
                v = int(codes[i]) - 256 if codes[i] >= 128 else int(codes[i])
            else:
                v = (int(codes[i // 2]) >> (4 * (i % 2)) & 0x0F) - int(zeros[n, k // group])
            i += 1
            sums[k // unit] = sums.get(k // unit, 0) + v * int(xq[k])
            magnitude += abs(v * int(xq[k])) * float(scales[n, k // group]) * float(sx[k // 128])
        b = 0.0 if bias is None else float(bias[n])
        y[n] = sum(float(s) * float(scales[n, u * unit // group]) * float(sx[u * unit // 128]) for u, s in sums.items()) + b
        bound[n] = (len(sums) + 8) * EPS32 * magnitude + EPS32 * abs(b) + 1e-30
    return y, bound


# --------------------------------------------------------------------------- detection
def expected_index(w: torch.Tensor) -> torch.Tensor:
    """Bit i of byte b of row n = column 32 b + 4 i of row n kept, rows padded to 8 bytes per 256 columns."""
    rows, cols = w.shape
    stride = -(-cols // 256) * 8
    out = torch.zeros(rows, stride, dtype=torch.uint8)
    kept = w != 0
    for n in range(rows):
        for block in range(cols // 4):
            if kept[n, 4 * block]:
                out[n, block // 8] |= 1 << (block % 8)
    return out


def test_detection_of_blocked_and_unblocked_masks():
    w = blocked_weight(9, 100, 0.6, 1)  # 100 columns: the last 32-column vector is partial
    p = Q.pack_int4(w, group_size=32)
    assert p.index_blocks and "1x4 blocks" in repr(p)
    assert torch.equal(Q.block_index(p), expected_index(w))

    almost = w.clone()
    almost[4, 8:12] = torch.tensor([1.0, 1.0, 1.0, 0.0])  # one nibble of three kept columns
    assert not Q.pack_int8(almost, close_blocks=False).index_blocks
    single = torch.zeros_like(w)
    single[0, 97] = 1.0  # one kept column in the last nibble
    assert not Q.pack_int8(single).index_blocks

    assert Q.pack_int8(torch.zeros(5, 64)).index_blocks  # every row empty
    assert Q.pack_int8(torch.ones(5, 64)).index_blocks  # every row full
    assert torch.equal(Q.block_index(Q.pack_int8(torch.ones(3, 36))), expected_index(torch.ones(3, 36)))

    ragged = blocked_weight(6, 30, 0.5, 2)  # cols % 4 != 0, even with the last two columns pruned
    ragged[:, 28:] = 0
    assert not Q.pack_int4(ragged, group_size=None).index_blocks
    g = torch.Generator().manual_seed(4)
    unstructured = torch.randn(16, 64, generator=g) * (torch.rand(16, 64, generator=g) > 0.7)
    assert not Q.pack_int4(unstructured, group_size=64).index_blocks


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_closes_blocks_over_exact_zeros_only(bits):
    """A 1x4-pruned weight whose kept blocks hold a few exact zeros packs blocked, the zeros as codes of exactly 0;
    not when the closure would take a weight the mask drops, or more than 1/8 more codes."""
    w = blocked_weight(12, 128, 0.6, 11)
    kept = (w != 0).nonzero()
    holes = kept[torch.randperm(kept.shape[0], generator=torch.Generator().manual_seed(12))[:10]]
    w[holes[:, 0], holes[:, 1]] = 0.0  # 10 exact zeros in kept blocks (of ~600 kept weights)
    nonzeros = int((w != 0).sum())
    p = pack(w, bits, 32)
    assert p.index_blocks and p.nnz == nonzeros + 10
    assert (p.dequantize()[holes[:, 0], holes[:, 1]] == 0).all()  # the added codes stand for exactly 0
    loose = Q.pack_int8(w, group_size=32, close_blocks=False) if bits == 8 else Q.pack_int4(w, group_size=32, close_blocks=False)
    assert not loose.index_blocks and loose.nnz == nonzeros
    assert torch.equal(loose.dequantize(), p.dequantize())

    mask = w != 0
    dropped = w.clone()
    dropped[holes[0, 0], holes[0, 1]] = 5.0  # a nonzero the mask drops: the closure would change the weight
    assert not (Q.pack_int8(dropped, mask) if bits == 8 else Q.pack_int4(dropped, mask, 32)).index_blocks
    unstructured = torch.randn(12, 128, generator=torch.Generator().manual_seed(13))
    unstructured[torch.rand(12, 128, generator=torch.Generator().manual_seed(14)) < 0.7] = 0  # closure: +150%
    assert pack(unstructured, bits, 32).nnz == int((unstructured != 0).sum())


def test_block_index_follows_an_in_place_mask_change():
    w = blocked_weight(4, 64, 0.5, 3)
    p = Q.pack_int8(w)
    assert p.index_blocks
    p.masks[0, 0] ^= 1  # no longer blocked (and no longer consistent with the offsets)
    with pytest.raises(Q.KernelInputError):
        Q.block_index(p)
    p.masks[0, 0] ^= 1
    assert torch.equal(Q.block_index(p), expected_index(w))


# --------------------------------------------------------------------------- parity
SHAPES = [(21, 300, 0.7), (7, 36, 0.5), (6, 132, 0.0), (5, 516, 0.9), (9, 512, 0.6)]


@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("bits", [4, 8])
def test_block_path_equals_the_bitmask_path_and_the_plain_loop(bits, group):
    paths = [path for path in VECTOR_PATHS if path in Q.quantized_isas()]
    if not paths:
        pytest.skip(f"no vector quantized path on this CPU ({Q.quantized_isas()})")
    for seed, (rows, cols, sparsity) in enumerate(SHAPES):
        p = pack(blocked_weight(rows, cols, sparsity, seed), bits, group)
        assert p.index_blocks
        g = torch.Generator().manual_seed(100 + seed)
        x, bias = torch.randn(4, cols, generator=g) * 2, torch.randn(rows, generator=g)
        x[0, :40] = 0  # an all-zero stretch in the first activation block
        references = [loop_reference(p, row.numpy(), bias.numpy()) for row in x]
        for path in paths:
            for tokens in (1, 2, 3, 4):  # the 1-token GEMV and the GEMV of 2-4 tokens
                got = run(p, x[:tokens], bias, path, blocks=True)
                assert torch.equal(got, run(p, x[:tokens], bias, path, blocks=False)), f"{path} {tokens} {p!r}"
                for t in range(tokens):
                    y_ref, bound = references[t]
                    err = np.abs(got[t].double().numpy() - y_ref)
                    assert (err <= bound).all(), f"{path} tokens={tokens} {p!r}: error {err.max():.3g}"


@pytest.mark.parametrize(("bits", "group"), [(8, None), (8, 64), (4, 128), (4, 32)])  # int4/128: AVX-512's 1-token path
@pytest.mark.parametrize("path", VECTOR_PATHS)
def test_the_vector_paths_read_the_block_index(path, bits, group):
    """A wrong block index (another blocked mask with the same kept count per row) changes the result: the GEMV
    kernels really walk the index, not the bitmask; the portable path and the GEMM ignore it."""
    require(path)
    rows, cols = 8, 256
    w = blocked_weight(rows, cols, 0.5, 7)
    g = torch.Generator().manual_seed(8)
    w[:, :8] = torch.rand(rows, 8, generator=g) + 0.5  # the first two blocks kept in every row
    w[:, 8:16] = 0.0
    p = pack(w, bits, group)
    shifted = Q.block_index(p).clone()
    shifted[:, 0] = (shifted[:, 0] & 0xF0) | 0x0C  # blocks 2, 3 instead of 0, 1: the same count per row
    x = torch.randn(6, cols, generator=g)
    lib = Q._lib()

    def call(isa: str, blocks: torch.Tensor | None, tokens: int = 1) -> torch.Tensor:
        y = torch.empty(tokens, rows)
        code = lib.sq_linear_blocks(
            x.data_ptr(), tokens, p.masks.data_ptr(), p.offsets.data_ptr(), p.codes.data_ptr(), p.scales.data_ptr(),
            None if bits == 8 else p.zeros.data_ptr(), None if blocks is None else blocks.data_ptr(), rows, cols, bits,
            group or cols, None, y.data_ptr(),
            Q.QUANT_ISA_NAMES.index(isa), 1,
        )  # fmt: skip
        assert code == 0
        return y

    for tokens in (1, 2):  # the 1-token GEMV and the GEMV of 2-4 tokens
        right = call(path, None, tokens)
        assert torch.equal(call(path, Q.block_index(p), tokens), right)
        assert not torch.allclose(call(path, shifted, tokens), right)
        with Q.use_block_path(False):
            assert torch.equal(call(path, shifted, tokens), right)
    assert torch.equal(call("portable", shifted), call("portable", None))
    assert torch.equal(call(path, shifted, 6), call(path, None, 6))  # the GEMM


def test_threads_and_the_module_take_the_block_path():
    paths = [path for path in VECTOR_PATHS if path in Q.quantized_isas()]
    if not paths:
        pytest.skip(f"no vector quantized path on this CPU ({Q.quantized_isas()})")
    w = blocked_weight(576, 576, 0.7, 9)
    module = Q.QuantizedSparseLinear.from_packed(Q.pack_int4(w, group_size=64), torch.randn(576))
    assert "index=1x4 blocks" in repr(module)
    x = torch.randn(1, 576, generator=torch.Generator().manual_seed(10))
    for path in paths:
        with Q.use_quantized_isa(path):
            kernels.set_num_threads(2)
            two = module(x)
            with Q.use_block_path(False):
                assert torch.equal(module(x), two)
            kernels.set_num_threads(1)
            assert torch.equal(module(x), two)  # rows are split between threads; each row's sum is the same


def test_unblocked_masks_keep_the_bitmask_path():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(12, 64, generator=g) * (torch.rand(12, 64, generator=g) > 0.7)
    p = Q.pack_int4(w, group_size=32)
    assert not p.index_blocks and Q.block_index(p) is None and "index=bitmask" in repr(p)
    assert Q.pointers(p)[-1] is None  # the kernels get no block index


def test_editing_the_returned_block_index_does_not_change_the_kernels_result():
    """block_index() hands out a copy: the kernels read the weight's own index, which a caller cannot edit."""
    paths = [p for p in VECTOR_PATHS if p in Q.quantized_isas()]
    if not paths:
        pytest.skip(f"no vector quantized path on this CPU ({Q.quantized_isas()})")
    g = torch.Generator().manual_seed(0)
    keep = (torch.rand(8, 16, generator=g) > 0.5).repeat_interleave(4, dim=1)
    p, x = Q.pack_int8(torch.randn(8, 64, generator=g) * keep), torch.randn(1, 64, generator=g)
    with Q.use_quantized_isa(paths[0]):
        before = Q.sparse_linear_quantized(x, p)
        Q.block_index(p).zero_()
        assert torch.equal(Q.sparse_linear_quantized(x, p), before)


def test_overlapping_use_block_path_contexts_in_two_threads_leave_the_switch_on():
    """Two threads' use_block_path(False) blocks that close out of order: the path is off while either is open and
    on again once both have closed."""
    lib = Q._lib()
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def first() -> None:
        with Q.use_block_path(False):
            a_inside.set()
            b_inside.wait(5)
        a_left.set()

    def second() -> None:
        a_inside.wait(5)
        with Q.use_block_path(False):
            b_inside.set()
            a_left.wait(5)
            seen.append(lib.sq_set_block_path(0))  # still off after the first block closed (returns the setting)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [0]
    assert lib.sq_set_block_path(1) == 1, "both blocks have closed, yet the block path is off process-wide"
