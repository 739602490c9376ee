"""CPU sparse kernels: the packed format, every instruction-set path against dense matmul, the torch op,
SparseLinear / sparsify_model on a tiny Llama, and bad input as Python exceptions.

Reference: float64 dense matmul of the unpacked weight (``x.double() @ W.double().T + b``). Tolerance:
the worst-case fp32 dot-product error bound, ``K * eps32 * (|x| @ |W|.T + |b|)`` (a wrong index or a
dropped value is an O(1) relative error and fails it by orders of magnitude).
"""

from __future__ import annotations

import math

import pytest
import torch

from strataprune import kernels
from strataprune.kernels import ops  # also registers torch.ops.strataprune.sparse_linear

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels not built: {kernels.available().reason}")

EPS32 = torch.finfo(torch.float32).eps
SHAPES = [(37, 53), (16, 16), (1, 1), (100, 300), (257, 700), (40, 1100), (9, 0), (0, 7)]
SPARSITIES = [0.0, 0.5, 0.9, 0.99]
TOKENS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 128)


@pytest.fixture(autouse=True)
def one_torch_thread():
    # the references are small torch ops; on a shared 2-core machine a 2-thread OpenMP op can wait milliseconds
    # for a descheduled thread. The kernels' own thread count is set explicitly where it matters.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def sparse_weight(rows: int, cols: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """Random weight with ~sparsity zeros, plus an all-zero row and a fully dense row when there are rows to spare."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    if rows >= 3:
        w[1] = 0
        w[2] = torch.randn(cols, generator=g).abs() + 0.1
    return w


def assert_matches_dense(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    x64, w64 = x.double().reshape(math.prod(x.shape[:-1]), w.shape[1]), w.double()
    bias = b.double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    ref = x64 @ w64.T + bias
    bound = max(1, w.shape[1]) * EPS32 * (x64.abs() @ w64.abs().T + bias.abs()) + 1e-30
    err = (y.double().reshape(ref.shape) - ref).abs()
    assert y.dtype == torch.float32 and y.shape == (*x.shape[:-1], w.shape[0])
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


# --------------------------------------------------------------------------- format
@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_pack_unpack_round_trip_is_exact(rows, cols, sparsity):
    w = sparse_weight(rows, cols, sparsity)
    packed = kernels.pack(w)
    assert torch.equal(packed.unpack(), w)
    assert packed.nnz == int((w != 0).sum())
    packed.validate()


def test_format_fields_follow_their_definition():
    w = sparse_weight(5, 300, 0.6, seed=3)
    p = kernels.pack(w)
    groups, chunks = 19, 2
    assert p.masks.shape == (5, groups) and p.offsets.shape == (5 * chunks + 1,) and p.values.shape == (p.nnz,)
    position = 0
    for n in range(5):  # plain loops from the definition in format.py
        for g in range(groups):
            word = int(p.masks[n, g]) & 0xFFFF
            for j in range(16):
                k = 16 * g + j
                assert bool(word >> j & 1) == (k < 300 and bool(w[n, k] != 0))
        for c in range(chunks):
            assert int(p.offsets[n * chunks + c]) == position
            for k in range(256 * c, min(300, 256 * (c + 1))):
                if w[n, k] != 0:
                    assert p.values[position] == w[n, k]
                    position += 1
    assert int(p.offsets[-1]) == position == p.nnz


@pytest.mark.parametrize("sparsity,expected", [(0.5, 0.535), (0.7, 0.335), (0.9, 0.135)])
def test_bytes_per_weight(sparsity, expected):
    w = torch.randn(256, 1024)
    w.view(-1)[torch.randperm(w.numel())[: round(sparsity * w.numel())]] = 0
    p = kernels.pack(w)
    assert p.nbytes / p.dense_nbytes == pytest.approx(expected, abs=0.002)


# --------------------------------------------------------------------------- kernels vs dense, every path
@pytest.fixture(scope="module")
def cases():
    """Per (shape, sparsity): weight, packed, bias, and one input per token count (GEMV 1..8, GEMM 9 and 128)."""
    out = []
    for rows, cols in SHAPES:
        for sparsity in SPARSITIES:
            w = sparse_weight(rows, cols, sparsity, seed=rows + cols)
            g = torch.Generator().manual_seed(rows * cols)
            xs = [torch.randn(tokens, cols, generator=g) for tokens in TOKENS]
            out.append((w, kernels.pack(w), torch.randn(rows, generator=g), xs))
    return out


@pytest.mark.parametrize("isa", kernels.ISA_NAMES)
@pytest.mark.parametrize("threads", [1, 2])
def test_every_path_matches_dense_matmul(cases, isa, threads):
    if isa not in kernels.isas():
        pytest.skip(f"{isa} not supported by this CPU")
    kernels.set_num_threads(threads)
    try:
        for w, packed, bias, xs in cases:
            with kernels.use_isa(isa):
                with_bias = [kernels.sparse_linear(x, packed, bias) for x in xs]
                without = kernels.sparse_linear(xs[0], packed)
            assert_matches_dense(torch.cat(with_bias), torch.cat(xs), w, bias)
            assert_matches_dense(without, xs[0], w, None)
    finally:
        kernels.set_num_threads(None)


def loop_linear(p, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[list[list[float]], list[list[float]]]:
    """y = x W^T + b straight from the packed buffers with plain loops (format.py's definition: bit j of mask
    word g is column 16 g + j, values in storage order), in float64, and the fp32 bound of each entry."""
    rows = p.shape[0]
    masks, values = p.masks.tolist(), p.values.tolist()
    xs = x.tolist()
    y = [[0.0] * rows for _ in xs]
    bound = [[0.0] * rows for _ in xs]
    position = 0
    for n in range(rows):
        kept = []
        for g, word in enumerate(masks[n]):
            for j in range(16):
                if (word & 0xFFFF) >> j & 1:
                    kept.append((16 * g + j, values[position]))
                    position += 1
        for t, row in enumerate(xs):
            b = 0.0 if bias is None else float(bias[n])
            y[t][n] = sum(v * row[k] for k, v in kept) + b
            bound[t][n] = (len(kept) + 6) * EPS32 * (sum(abs(v * row[k]) for k, v in kept) + abs(b)) + 1e-30
    assert position == p.nnz
    return y, bound


def assert_matches_the_loop(isa: str, p, x: torch.Tensor, bias: torch.Tensor) -> None:
    """``sparse_linear`` on ``isa`` within the plain loop's rounding bound, every output."""
    y_ref, bound = loop_linear(p, x, bias)
    with kernels.use_isa(isa):
        y = kernels.sparse_linear(x, p, bias).tolist()
    for t in range(len(y_ref)):
        for n in range(len(y_ref[t])):
            assert abs(y[t][n] - y_ref[t][n]) <= bound[t][n], (isa, tuple(x.shape), t, n)


@pytest.mark.parametrize("isa", kernels.ISA_NAMES)
def test_every_path_matches_a_plain_loop_over_the_format(isa):
    """Includes the last rows of the values buffer, which the AVX2 GEMV reads with masked loads."""
    if isa not in kernels.isas():
        pytest.skip(f"{isa} not supported by this CPU")
    for rows, cols, sparsity in [(13, 300, 0.7), (6, 37, 0.0), (9, 100, 0.95), (3, 1, 0.5)]:
        w = sparse_weight(rows, cols, sparsity, seed=rows * cols)
        p = kernels.pack(w)
        g = torch.Generator().manual_seed(cols)
        bias = torch.randn(rows, generator=g)
        for tokens in (1, 3, 9):
            assert_matches_the_loop(isa, p, torch.randn(tokens, cols, generator=g), bias)


# GEMM edge shapes: tokens around the 8-token transpose steps, the 16-token input steps, the 64-token blocks and
# the 128-token passes; rows around the 8/16-row output steps and the 32-row tiles; columns around the 8-column
# transpose steps, the 128-column segments and the 1024-column whole-row tiles
GEMM_TOKENS = (9, 15, 16, 17, 63, 64, 65, 127, 129, 200, 257)
GEMM_SHAPES = [(1, 9), (7, 8), (15, 129), (16, 128), (17, 127), (33, 300), (65, 1024), (31, 1025), (40, 2049)]


@pytest.mark.parametrize("isa", kernels.ISA_NAMES)
@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_edge_shapes_match_dense_matmul(isa, threads):
    """Every GEMM tail at once: empty and fully dense rows (sparse_weight), tokens that fill no block exactly."""
    if isa not in kernels.isas():
        pytest.skip(f"{isa} not supported by this CPU")
    kernels.set_num_threads(threads)
    try:
        for rows, cols in GEMM_SHAPES:
            for sparsity in (0.0, 0.7, 0.97):
                w = sparse_weight(rows, cols, sparsity, seed=rows * 7 + cols)
                packed, g = kernels.pack(w), torch.Generator().manual_seed(rows + cols)
                bias = torch.randn(rows, generator=g)
                for tokens in GEMM_TOKENS:
                    x = torch.randn(tokens, cols, generator=g)
                    with kernels.use_isa(isa):
                        y = kernels.sparse_linear(x, packed, bias)
                    assert_matches_dense(y, x, w, bias)
    finally:
        kernels.set_num_threads(None)


@pytest.mark.parametrize("isa", kernels.ISA_NAMES)
def test_gemm_matches_a_plain_loop_over_the_format(isa):
    """The GEMM (segments, transposes, several token blocks) against the loop over the packed buffers."""
    if isa not in kernels.isas():
        pytest.skip(f"{isa} not supported by this CPU")
    for rows, cols, sparsity, tokens in [(19, 150, 0.6, 70), (5, 1030, 0.9, 17), (34, 40, 0.3, 66)]:
        w = sparse_weight(rows, cols, sparsity, seed=rows + cols)
        p = kernels.pack(w)
        g = torch.Generator().manual_seed(rows)
        bias = torch.randn(rows, generator=g)
        assert_matches_the_loop(isa, p, torch.randn(tokens, cols, generator=g), bias)


def test_paths_agree_on_a_large_layer_with_threads():
    w = sparse_weight(1536, 576, 0.7, seed=7)
    packed, x = kernels.pack(w), torch.randn(2, 130, 576)
    for isa in kernels.isas():
        for threads in (1, 2):
            kernels.set_num_threads(threads)
            with kernels.use_isa(isa):
                assert_matches_dense(kernels.sparse_linear(x, packed), x, w, None)
                assert_matches_dense(kernels.sparse_linear(x[:, :1].contiguous(), packed), x[:, :1], w, None)
    kernels.set_num_threads(None)


# --------------------------------------------------------------------------- bad input is an exception
def test_bad_inputs_are_python_exceptions_naming_the_problem():
    w = sparse_weight(20, 40, 0.5)
    p = kernels.pack(w)
    x = torch.randn(3, 40)
    op = torch.ops.strataprune.sparse_linear
    cases = [
        (lambda: op(x.double(), p.masks, p.values, p.offsets, None, 40), "float32"),
        (lambda: op(torch.randn(3, 41), p.masks, p.values, p.offsets, None, 40), "40 features"),
        (lambda: op(torch.randn(40, 3).T, p.masks, p.values, p.offsets, None, 40), "contiguous"),
        (
            lambda: ops.linear(x.to("meta"), p.masks, p.values, p.offsets, None, 40),
            "CPU",
        ),  # the eager kernel (meta goes to the fake)
        (lambda: op(x, p.masks.int(), p.values, p.offsets, None, 40), "int16"),
        (lambda: op(x, p.masks, p.values, p.offsets[:-1].contiguous(), None, 40), "shape"),
        (lambda: op(x, p.masks, p.values[:-1].contiguous(), p.offsets, None, 40), "inconsistent"),
        (lambda: op(x, p.masks, p.values, torch.zeros_like(p.offsets), None, 40), "inconsistent"),
        (lambda: op(x, p.masks, p.values, p.offsets, torch.randn(19), 40), "bias"),
        (lambda: kernels.pack(torch.randn(4, 4, dtype=torch.bfloat16)), "float32"),
        (lambda: kernels.pack(torch.randn(4)), "2-D"),
        (lambda: kernels.set_isa("sse9"), "sse9"),
        (lambda: kernels.set_num_threads(-1), "-1"),
        (lambda: kernels.sparsify_model(torch.nn.Linear(2, 2), min_sparsity=1.5), "1.5"),
        (lambda: kernels.SparseLinear.from_dense(w), "nn.Linear"),
    ]
    for call, message in cases:
        with pytest.raises(kernels.KernelInputError, match=message):
            call()
    layer = kernels.SparseLinear.from_dense(torch.nn.Linear(40, 20))
    with pytest.raises(kernels.KernelInputError, match="float32"):
        layer(torch.randn(2, 40, dtype=torch.bfloat16))
    y = layer(x.T.contiguous().T)  # a non-contiguous input to the module is copied, as nn.Linear accepts it
    assert_matches_dense(y, x, layer.to_dense().weight.detach(), layer.bias)


def test_missing_library_is_reported_not_raised(tmp_path):
    from strataprune.kernels._library import load_library

    lib, availability = load_library(tmp_path)
    assert lib is None and not availability and "compiler" in availability.reason


# --------------------------------------------------------------------------- torch integration
def test_custom_op_passes_opcheck_and_exports():
    w = sparse_weight(24, 40, 0.7)
    p = kernels.pack(w)
    args = (torch.randn(5, 40), p.masks, p.values, p.offsets, torch.randn(24), 40)
    torch.library.opcheck(torch.ops.strataprune.sparse_linear.default, args, test_utils=("test_schema", "test_faketensor"))
    layer = kernels.SparseLinear.from_packed(p, torch.randn(24))
    exported = torch.export.export(layer, (torch.randn(3, 40),))
    assert any("strataprune.sparse_linear" in str(node.target) for node in exported.graph.nodes)
    x = torch.randn(3, 40)
    assert torch.equal(exported.module()(x), layer(x))


def test_sparse_linear_module_state_dict_round_trip():
    dense = torch.nn.Linear(300, 70)
    with torch.no_grad():
        dense.weight.copy_(sparse_weight(70, 300, 0.8))
    layer = kernels.SparseLinear.from_dense(dense)
    x = torch.randn(4, 300)
    assert_matches_dense(layer(x), x, dense.weight.detach(), dense.bias.detach())
    fresh = kernels.SparseLinear(300, 70)  # a different (empty) pattern: the loaded sizes win
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.to_dense().weight, dense.weight)
    broken = layer.state_dict()
    broken["offsets"] = broken["offsets"].flip(0).contiguous()
    with pytest.raises(kernels.KernelInputError, match="inconsistent"):
        kernels.SparseLinear(300, 70).load_state_dict(broken)


def _magnitude_prune(model: torch.nn.Module, sparsity: float) -> None:
    """Zero the smallest-magnitude fraction of every decoder Linear (an independent pruning, not strataprune's)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                w = module.weight
                k = int(sparsity * w.numel())
                threshold = w.abs().flatten().kthvalue(k).values
                w[w.abs() <= threshold] = 0


def test_sparsify_model_tiny_llama_same_logits_and_greedy_tokens():
    from support import tiny_model

    model = tiny_model("llama")
    _magnitude_prune(model, 0.7)
    sparse = tiny_model("llama")
    sparse.load_state_dict(model.state_dict())
    report = kernels.sparsify_model(sparse, min_sparsity=0.5, threads=2)
    assert len(report.converted) == 3 * 7 and "lm_head" in report.kept_dense  # tied to the embeddings: stays dense
    assert 0.33 < report.packed_bytes / report.dense_bytes < 0.35
    assert sum(isinstance(m, kernels.SparseLinear) for m in sparse.modules()) == 21
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense_logits, sparse_logits = model(ids).logits, sparse(ids).logits
        # fp32 with a different summation order: logits agree to 1e-4 absolute (they are O(1))
        assert (dense_logits - sparse_logits).abs().max() < 1e-4
        prompt = ids[:1, :12]
        dense_tokens = model.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=True, pad_token_id=0)
        sparse_tokens = sparse.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(dense_tokens, sparse_tokens)
    kernels.set_num_threads(None)


def test_sparsify_model_keeps_low_sparsity_and_non_fp32_layers_dense():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 32).to(torch.bfloat16))
    with torch.no_grad():
        model[0].weight.copy_(sparse_weight(32, 32, 0.9))
        model[1].weight.copy_(sparse_weight(32, 32, 0.2))
    report = kernels.sparsify_model(model, min_sparsity=0.5)
    assert list(report.converted) == ["0"] and set(report.kept_dense) == {"1", "2"}
    assert isinstance(model[0], kernels.SparseLinear) and type(model[1]) is torch.nn.Linear
