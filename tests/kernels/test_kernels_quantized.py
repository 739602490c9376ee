"""Quantized sparse kernels (int8 / int4 codes under the bitmask index): packing, and every path (portable,
AVX2 with and without AVX-VNNI, AVX-512) against two independent references.

1. A plain Python loop over the packed buffers, written from the format's definition (module docstring of
   strataprune/kernels/quantized.py): bit j of mask word g is column 16 g + j, codes in storage order (bytes,
   or low-then-high nibbles), scale and zero of column k's group, and the input quantized per 128-column block
   with numpy float32 scalars (fp32 division, round half to even, as the kernels do). Its per-unit integer
   sums are exact; the kernels' only freedom is fp32 rounding when a unit's sum (or its share in one SIMD lane)
   is scaled and accumulated: one rounding for scale * sx, one per unit accumulated, four for the sum over
   lanes, one for the bias: bound (units + 8) * eps32 * sum_k |v xq| scale sx + eps32 |b|.
2. Dequantized fp32 matmul in float64, x @ W^T: the kernels see x through its int8 quantization, off by at most
   sx * (1/2 + 127 eps32) per element, so |y - ref| <= sum_k |W[n, k]| * sx(k) * (1/2 + 1e-4) + the fp32 bound of 1.
A wrong column, code, nibble order, scale, zero or activation block fails both by orders of magnitude.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from strataprune import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels not built: {kernels.available().reason}")

if kernels.available():
    from strataprune.kernels import quantized as Q

EPS32 = float(np.finfo(np.float32).eps)
GROUPS = (32, 64, 128, None)
TOKENS = (1, 2, 3, 4, 6, 9)  # GEMV up to 4 tokens, GEMM above


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def weight(rows: int, cols: int, sparsity: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    if rows >= 3:
        w[1] = 0  # an empty row
        w[2] = torch.randn(cols, generator=g).abs() + 0.1  # a full row
    return w


def pack(w: torch.Tensor, bits: int, group: int | None):
    return Q.pack_int8(w, group_size=group) if bits == 8 else Q.pack_int4(w, group_size=group)


# --------------------------------------------------------------------------- the plain-loop reference
def loop_reference(p, x: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(y, bound) from the packed buffers with plain loops (see the module docstring)."""
    rows, cols = p.shape
    masks = p.masks.numpy().astype(np.int64) & 0xFFFF
    offsets, codes = p.offsets.numpy(), p.codes.numpy()
    scales = p.scales.numpy()
    zeros = None if p.zeros is None else p.zeros.numpy()
    group = p.group_size
    unit = 128 if group == cols else min(group, 128)
    tokens = x.shape[0]
    # the input, quantized per 128-column block
    xq = np.zeros((tokens, cols), dtype=np.int64)
    sx = np.zeros((tokens, -(-cols // 128)), dtype=np.float32)
    for t in range(tokens):
        for b in range(sx.shape[1]):
            amax = np.float32(0)
            for k in range(128 * b, min(cols, 128 * b + 128)):
                amax = max(amax, np.float32(abs(x[t, k])))
            s = np.float32(amax / np.float32(127))
            sx[t, b] = s
            for k in range(128 * b, min(cols, 128 * b + 128)):
                xq[t, k] = 0 if s == 0 else int(np.clip(np.rint(np.float32(x[t, k]) / s), -127, 127))
    y = np.zeros((tokens, rows))
    bound = np.zeros((tokens, rows))
    for n in range(rows):
        kept = []  # (column, integer value)
        i = int(offsets[n])
        for g in range(masks.shape[1]):
            for j in range(16):
                if masks[n, g] >> j & 1:
                    k = 16 * g + j
                    if p.bits == 8:
                        v = int(codes[i]) - 256 if codes[i] >= 128 else int(codes[i])
                    else:
                        q = int(codes[i // 2]) & 0x0F if i % 2 == 0 else int(codes[i // 2]) >> 4
                        v = q - int(zeros[n, k // group])
                    kept.append((k, v))
                    i += 1
        assert i == offsets[n + 1]
        for t in range(tokens):
            sums: dict[int, int] = {}
            magnitude = 0.0  # sum of |v * xq| * scale * sx: bounds every partial sum, however a path splits a unit
            for k, v in kept:
                sums[k // unit] = sums.get(k // unit, 0) + v * int(xq[t, k])
                magnitude += abs(v * int(xq[t, k])) * float(scales[n, k // group]) * float(sx[t, k // 128])
            terms = [
                float(total) * float(scales[n, u * unit // group]) * float(sx[t, u * unit // 128]) for u, total in sums.items()
            ]
            b = float(bias[n]) if bias is not None else 0.0
            y[t, n] = sum(terms) + b
            bound[t, n] = (len(terms) + 8) * EPS32 * magnitude + EPS32 * abs(b) + 1e-30
    return y, bound


def run(p, x: torch.Tensor, bias: torch.Tensor | None, isa: str, threads: int = 1) -> torch.Tensor:
    kernels.set_num_threads(threads)
    try:
        with Q.use_quantized_isa(isa):
            return Q.sparse_linear_quantized(x, p, bias)
    finally:
        kernels.set_num_threads(None)


@pytest.fixture(scope="module")
def loop_cases():
    """Small weights (every group size, both widths, ragged columns) with their loop references."""
    out = []
    seed = 0
    for bits in (8, 4):
        for group in GROUPS:
            for rows, cols, sparsity in [(21, 300, 0.7), (6, 70, 0.0), (5, 129, 0.95)]:
                seed += 1
                w = weight(rows, cols, sparsity, seed)
                p = pack(w, bits, group)
                g = torch.Generator().manual_seed(seed)
                bias = torch.randn(rows, generator=g)
                x = torch.randn(sum(TOKENS), cols, generator=g) * 2
                x[0, :40] = 0  # an all-zero stretch of the first activation block
                y, bound = loop_reference(p, x.numpy(), bias.numpy())
                out.append((p, x, bias, y, bound))
    return out


@pytest.mark.parametrize("isa", Q.QUANT_ISA_NAMES if kernels.available() else [])
def test_every_path_matches_the_plain_loop(loop_cases, isa):
    if isa not in Q.quantized_isas():
        pytest.skip(f"{isa}: not available on this CPU (quantized paths here: {Q.quantized_isas()})")
    for p, x, bias, y_ref, bound in loop_cases:
        start = 0
        for tokens in TOKENS:  # the same rows through GEMV (<= 4 tokens) and GEMM
            xs = x[start : start + tokens]
            y = run(p, xs, bias, isa).double().numpy()
            err = np.abs(y - y_ref[start : start + tokens])
            worst = np.unravel_index(err.argmax(), err.shape)
            assert (err <= bound[start : start + tokens]).all(), (
                f"{p!r} tokens={tokens}: error {err[worst]:.3g} > bound {bound[start : start + tokens][worst]:.3g}"
            )
            start += tokens


@pytest.mark.parametrize("table", [0, 1], ids=["byte-tables", "16-bit-table"])
@pytest.mark.parametrize("isa", ["avx2", "avx2-novnni"])
def test_both_avx2_shuffle_tables_match_the_plain_loop(loop_cases, isa, table):
    """The AVX2 1-token GEMV builds its shuffle controls from 8-bit tables or one 16-bit table (chosen by the L2 size);
    each, forced, against the plain loop."""
    import ctypes

    if isa not in Q.quantized_isas():
        pytest.skip(f"{isa}: not available on this CPU (quantized paths here: {Q.quantized_isas()})")
    lib = Q._lib()
    lib.sq_set_avx2_shuffle.argtypes = [ctypes.c_int]
    lib.sq_set_avx2_shuffle(table)
    try:
        for p, x, bias, y_ref, bound in loop_cases:
            y = run(p, x[:1], bias, isa).double().numpy()
            assert (np.abs(y - y_ref[:1]) <= bound[:1]).all(), f"{p!r}: max error {np.abs(y - y_ref[:1]).max():.3g}"
    finally:
        lib.sq_set_avx2_shuffle(-1)


def test_the_package_wide_isa_switch_reaches_the_quantized_kernels():
    w = weight(40, 256, 0.7, 5)
    p = Q.pack_int4(w, group_size=64)
    x = torch.randn(2, 256)
    for isa in kernels.isas():
        if isa not in Q.quantized_isas():
            continue
        with kernels.use_isa(isa):
            via_global = Q.sparse_linear_quantized(x, p)
        assert torch.equal(via_global, run(p, x, None, isa))


# --------------------------------------------------------------------------- against dense fp32 matmul
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", GROUPS)
def test_paths_match_dequantized_matmul_with_threads(bits, group):
    w = weight(300, 576, 0.7, 11)
    p = pack(w, bits, group)
    dense = p.dequantize().double()
    g = torch.Generator().manual_seed(3)
    for tokens in (1, 4, 37):
        x = torch.randn(tokens, 576, generator=g)
        x[:, 7] *= 30  # an outlier column: its block's scale is 30x coarser
        _, sx = Q.quantize_input(x)
        step = sx.double().repeat_interleave(128, dim=-1)[:, :576] * (0.5 + 1e-4)
        ref = x.double() @ dense.T
        bound = step @ dense.abs().T + 576 * EPS32 * (x.double().abs() @ dense.abs().T) + 1e-30
        for isa in Q.quantized_isas():
            for threads in (1, 2):
                err = (run(p, x, None, isa, threads).double() - ref).abs()
                assert bool((err <= bound).all()), f"{isa} threads={threads} tokens={tokens}: max error {err.max():.3g}"


# --------------------------------------------------------------------------- packing and the format
def test_int4_grid_values_come_back_exactly_and_codes_follow_the_layout():
    rows, cols, group = 7, 200, 64
    g = torch.Generator().manual_seed(2)
    ngroups = math.ceil(cols / group)
    scales = torch.rand(rows, ngroups, generator=g) + 0.05
    zeros = torch.randint(0, 16, (rows, ngroups), generator=g).float()
    q = torch.randint(0, 16, (rows, cols), generator=g)
    s = scales.repeat_interleave(group, 1)[:, :cols]
    z = zeros.repeat_interleave(group, 1)[:, :cols]
    on_grid = s * (q - z)
    keep = torch.rand(rows, cols, generator=g) > 0.6
    keep[0, :] = True
    w = torch.where(keep, on_grid, 0.0)
    p = Q.pack_int4(w, keep, group, scales, zeros)
    assert torch.equal(p.dequantize(), w)  # kept weights that sit on the grid's zero stay kept (mask, not value)
    position = 0
    codes = p.codes.tolist()
    for n in range(rows):
        assert int(p.offsets[n]) == position
        for k in range(cols):
            if keep[n, k]:
                nibble = codes[position // 2] & 0x0F if position % 2 == 0 else codes[position // 2] >> 4
                assert nibble == int(q[n, k])
                position += 1
    assert int(p.offsets[-1]) == position == p.nnz
    assert len(codes) == math.ceil(position / 2) + 64 and not any(codes[-64:])


def test_int8_round_trip_error_is_at_most_half_a_step():
    w = weight(30, 500, 0.5, 4)
    for group in GROUPS:
        p = Q.pack_int8(w, group_size=group)
        gsize = group or 500
        step = p.scales.repeat_interleave(gsize, 1)[:, :500]
        err = (p.dequantize() - w).abs()
        assert bool((err <= step / 2 * (1 + 1e-6) + 1e-12).all())
        assert not bool(p.dequantize()[w == 0].any()) and p.nnz == int((w != 0).sum())  # pruned stay exact zeros


def test_pack_from_a_saved_grid_record():
    w = weight(8, 64, 0.5, 9)
    ref = Q.pack_int4(w, group_size=32)
    record = {"bits": 4, "groupsize": 32, "sym": False, "scale": ref.scales, "zero": ref.zeros.float()}
    again = Q.pack_from_grid(ref.dequantize(), record)
    assert torch.equal(again.dequantize(), ref.dequantize())


# masks 2/16 + codes 0.3 * bits / 8 + (scale 4 [+ zero 1]) / group + offsets 4 / cols
@pytest.mark.parametrize(
    "bits,group,expected",
    [
        (4, 128, 0.125 + 0.15 + 5 / 128 + 4 / 1024),
        (4, 32, 0.125 + 0.15 + 5 / 32 + 4 / 1024),
        (8, None, 0.125 + 0.3 + 4 / 1024 + 4 / 1024),
    ],
)
def test_bytes_per_weight_at_70_percent(bits, group, expected):
    w = torch.randn(256, 1024)
    w.view(-1)[torch.randperm(w.numel(), generator=torch.Generator().manual_seed(0))[: round(0.7 * w.numel())]] = 0
    p = pack(w, bits, group)
    assert p.nbytes / w.numel() == pytest.approx(expected, abs=0.003)


def test_degenerate_shapes():
    for rows, cols in [(0, 40), (5, 0), (1, 1), (3, 16)]:
        w = torch.randn(rows, cols)
        for bits in (8, 4):
            p = pack(w, bits, None)
            x = torch.randn(2, cols)
            for isa in Q.quantized_isas():
                y = run(p, x, None, isa)
                assert y.shape == (2, rows)
                if cols == 0:
                    assert not bool(y.any())


# --------------------------------------------------------------------------- bad input and torch integration
def test_bad_inputs_are_python_exceptions_naming_the_problem():
    w = weight(20, 64, 0.5, 1)
    p = Q.pack_int4(w, group_size=32)
    x = torch.randn(3, 64)
    op = torch.ops.strataprune.sparse_linear_quantized
    args = {
        "masks": p.masks,
        "offsets": p.offsets,
        "codes": p.codes,
        "scales": p.scales,
        "zeros": p.zeros,
        "bias": None,
        "in_features": 64,
        "bits": 4,
        "group_size": 32,
    }

    def call(**changes):
        a = {**args, **changes}
        return op(
            x if "x" not in a else a.pop("x"),
            a["masks"],
            a["offsets"],
            a["codes"],
            a["scales"],
            a["zeros"],
            a["bias"],
            a["in_features"],
            a["bits"],
            a["group_size"],
        )

    cases = [
        (lambda: call(x=x.double()), "float32"),
        (lambda: call(codes=p.codes[:-1].contiguous()), "inconsistent"),
        (lambda: call(offsets=torch.zeros_like(p.offsets)), "inconsistent"),
        (lambda: call(zeros=torch.full_like(p.zeros, 16)), r"\[0, 15\]"),
        (lambda: call(zeros=None), "zeros must be"),
        (lambda: call(group_size=48), "group_size"),
        (lambda: call(bits=3), "bits"),
        (lambda: call(scales=p.scales[:, :1].contiguous()), "scales"),
        (lambda: call(bias=torch.randn(7)), "bias"),
        (lambda: Q.pack_int4(w, group_size=48), "48"),
        (lambda: Q.pack_int4(w, mask=torch.ones(3, 3)), "shape"),
        (lambda: Q.pack_int4(w, group_size=32, scales=p.scales, zeros=p.zeros.float() + 0.5), "integers"),
        (lambda: Q.pack_int8(torch.full((2, 2), float("nan"))), "finite"),
        (lambda: Q.pack_from_grid(w, {"bits": 8}), "4-bit"),
        (lambda: Q.sparse_linear_quantized(x, w), "QuantizedWeight"),
    ]
    for fn, message in cases:
        with pytest.raises(kernels.KernelInputError, match=message):
            fn()
    with pytest.raises(kernels.KernelInputError, match="sse9"), Q.use_quantized_isa("sse9"):
        pass


def test_custom_op_passes_opcheck_and_exports():
    w = weight(24, 64, 0.7, 2)
    p = Q.pack_int8(w, group_size=64)
    args = (torch.randn(5, 64), p.masks, p.offsets, p.codes, p.scales, None, torch.randn(24), 64, 8, 64)
    torch.library.opcheck(
        torch.ops.strataprune.sparse_linear_quantized.default, args, test_utils=("test_schema", "test_faketensor")
    )

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name in ("masks", "offsets", "codes", "scales"):
                self.register_buffer(name, getattr(p, name))

        def forward(self, x):
            return torch.ops.strataprune.sparse_linear_quantized(
                x, self.masks, self.offsets, self.codes, self.scales, None, None, 64, 8, 64
            )

    layer = Layer()
    exported = torch.export.export(layer, (torch.randn(3, 64),))
    assert any("sparse_linear_quantized" in str(node.target) for node in exported.graph.nodes)
    x = torch.randn(3, 64)
    assert torch.equal(exported.module()(x), layer(x))


def test_quantized_sparse_linear_module_matches_the_op_and_round_trips_its_state_dict():
    dense = torch.nn.Linear(300, 70)
    with torch.no_grad():
        dense.weight.copy_(weight(70, 300, 0.7, 8))
    x = torch.randn(2, 5, 300)
    for bits, group in [(4, 64), (8, None)]:
        layer = Q.QuantizedSparseLinear.from_dense(dense, bits, group)
        expected = Q.sparse_linear_quantized(x.reshape(10, 300), layer.packed, layer.bias).reshape(2, 5, 70)
        assert torch.equal(layer(x), expected)
        assert torch.equal(layer(x.transpose(0, 1).contiguous().transpose(0, 1)), expected)  # strided input is copied
        fresh = Q.QuantizedSparseLinear(300, 70, bits, group)  # other (empty) sizes: the loaded ones win
        fresh.load_state_dict(layer.state_dict())
        assert torch.equal(fresh(x), expected)
        broken = layer.state_dict()
        broken["offsets"] = broken["offsets"].flip(0).contiguous()
        with pytest.raises(kernels.KernelInputError, match="inconsistent"):
            Q.QuantizedSparseLinear(300, 70, bits, group).load_state_dict(broken)
        exported = torch.export.export(layer, (torch.randn(3, 300),))
        assert any("sparse_linear_quantized" in str(node.target) for node in exported.graph.nodes)
