"""INT4 packing for ONNX Runtime's MatMulNBits: round trips, the spec as a plain loop, and the real operator."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from strataprune.contract.errors import DataError
from strataprune.deploy import int4

needs_ort = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="needs onnx and onnxruntime: pip install 'strataprune[deploy]'",
)


def grid_weight(rows: int, cols: int, groupsize: int | None, sparsity: float = 0.5, seed: int = 0):
    """A pruned weight whose kept values lie on a per-group min-max 4-bit grid (as SparseGPT records it)."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if groupsize is None else -(-cols // groupsize)
    scale = torch.rand(rows, groups, generator=gen) * 0.05 + 0.01
    zero = torch.randint(0, 16, (rows, groups), generator=gen).float()
    codes = torch.randint(0, 16, (rows, cols), generator=gen).float()
    from strataprune.engine.quantization import expand

    s, z = expand(scale, cols, groupsize), expand(zero, cols, groupsize)
    pruned = torch.rand(rows, cols, generator=gen) < sparsity
    codes = torch.where(pruned, z, codes)  # a pruned weight is code == zero point, i.e. exactly 0
    weight = s * (codes - z)
    return weight, {"bits": 4, "groupsize": groupsize, "sym": False, "scale": scale, "zero": zero}, codes


def test_nibble_packing_round_trip():
    values = np.random.default_rng(0).integers(0, 16, size=(3, 5, 32), dtype=np.uint8)
    packed = int4.pack_nibbles(values)
    assert packed.shape == (3, 5, 16) and packed[0, 0, 0] == values[0, 0, 0] | (values[0, 0, 1] << 4)
    assert np.array_equal(int4.unpack_nibbles(packed, 32), values)


@pytest.mark.parametrize("rows,cols,groupsize", [(8, 64, 32), (6, 200, None), (4, 96, 16)])
def test_packed_weight_dequantizes_to_the_same_values_by_the_spec(rows, cols, groupsize):
    weight, quant, codes = grid_weight(rows, cols, groupsize)
    packed = int4.pack_weight(weight, quant)
    block = packed["block_size"]
    # MatMulNBits' definition, element by element: w[n, k] = (q[n, k] - zp[n, k // block]) * scale[n, k // block]
    blocks = packed["blocks"]
    zp_bytes = packed["zero_points"].reshape(rows, -1)
    for n in range(rows):
        for k in range(cols):
            b, j = divmod(k, block)
            byte = packed["B"][n, b, j // 2]
            q = (byte >> 4) if j % 2 else (byte & 0x0F)
            zbyte = zp_bytes[n, b // 2]
            zp = (zbyte >> 4) if b % 2 else (zbyte & 0x0F)
            scale = packed["scales"][n * blocks + b]
            assert q == codes[n, k]
            assert (float(q) - float(zp)) * float(scale) == pytest.approx(float(weight[n, k]), abs=1e-6)
    assert np.allclose(int4.unpack_weight(packed), weight.numpy(), atol=1e-6)


def test_weight_off_its_grid_is_refused():
    weight, quant, _ = grid_weight(4, 64, 32)
    weight[1, 3] += 0.3 * float(quant["scale"][1, 0])
    with pytest.raises(DataError, match="off its recorded grid"):
        int4.pack_weight(weight, quant, "layer.q_proj")


def test_groupsize_that_is_not_a_power_of_two_is_refused():
    with pytest.raises(DataError, match="powers of two"):
        int4.block_size_for(96, 192)


@needs_ort
@pytest.mark.parametrize("groupsize", [32, None])
def test_matmulnbits_in_onnxruntime_computes_with_the_dequantized_weight(groupsize):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rows, cols = 48, 160
    weight, quant, _ = grid_weight(rows, cols, groupsize, seed=3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cols])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, rows])],
        [numpy_helper.from_array(weight.t().contiguous().numpy(), "wt")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    info = int4.rewrite_matmuls(model, {"layer.weight": weight}, {"layer": quant})
    assert info["replaced"] == 1 and not info["missing"]
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"] and all(i.name != "wt" for i in model.graph.initializer)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, cols)).astype(np.float32)
    y = session.run(None, {"x": x})[0]
    expected = (torch.from_numpy(x).double() @ weight.double().t()).numpy()
    assert np.abs(y - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    onnx.checker.check_model(model)
