"""ONNX files above protobuf's 2 GB limit are written with external data (checked with a lowered limit)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from strataprune.deploy import onnx_export  # noqa: E402


def two_weight_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((64, 64), dtype=np.float32), rng.standard_normal((64, 8), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph)


@pytest.mark.parametrize("limit, external", [(10**9, False), (10_000, True)])
def test_save_goes_external_by_the_weights_size(tmp_path, monkeypatch, limit, external):
    model = two_weight_model()
    weights = {init.name: numpy_helper.to_array(init).copy() for init in model.graph.initializer}
    monkeypatch.setattr(onnx_export, "INLINE_LIMIT", limit)  # 64*64*4 + 64*8*4 = 18 KB of weights
    path = tmp_path / "model.onnx"
    onnx_export.save(model, path)
    assert (tmp_path / "model.onnx.data").exists() is external
    back = onnx.load(str(path))
    assert {i.name: numpy_helper.to_array(i).tolist() for i in back.graph.initializer} == {
        k: v.tolist() for k, v in weights.items()
    }
