"""The onnxscript rule that stores a transposed weight (passes/transpose_weights.py): MatMul(x, Transpose(W)) becomes
MatMul(x, W^T) with W^T stored, the same numbers; a Transpose of a computed value is not a stored weight and stays."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from conftest import run_graph
from kiln.exporter.passes.transpose_weights import fold_weight_transposes


def graph(weight_is_stored: bool) -> ir.Model:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "W")
    nodes = [helper.make_node("Transpose", ["W" if weight_is_stored else "z", ], ["Wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Wt"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])]
    if not weight_is_stored:
        inputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [5, 4]))
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5])],
                          [w] if weight_is_stored else [])
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)]))


def test_a_stored_weight_is_transposed_once_and_stored():
    model, original = graph(True), graph(True)
    assert fold_weight_transposes(model) == 1
    assert [n.op_type for n in model.graph] == ["MatMul"]
    weight = model.graph.node(0).inputs[1]
    assert weight.is_initializer() and weight.const_value.numpy().shape == (4, 5)
    x = {"x": np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)}
    np.testing.assert_allclose(run_graph(model, x)[0], run_graph(original, x)[0], rtol=1e-6)


def test_a_computed_value_is_left_alone():
    model = graph(False)
    assert fold_weight_transposes(model) == 0
    assert [n.op_type for n in model.graph] == ["Transpose", "MatMul"]
