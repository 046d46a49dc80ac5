"""The fp16/bf16 graph pass (passes/half.py): types, fp32 islands with casts at their borders, fp32 graph inputs and
outputs, and the fp32 simulation of a half-precision graph against onnxruntime running the real one."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest


def _tiny_graph(path):
    """x -> MatMul(W) -> LayerNormalization -> Softmax -> Mul(2) -> y: a half op, two fp32 islands, a half op."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    W = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W")
    scale = numpy_helper.from_array(np.ones(8, np.float32), "scale")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("LayerNormalization", ["h", "scale"], ["n"]),
             helper.make_node("Softmax", ["n"], ["p"]), helper.make_node("Mul", ["p", "two"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])], [W, scale, two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.save(onnx.shape_inference.infer_shapes(model), str(path))
    return path


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_pass_types_and_islands(tmp_path, precision):
    from kiln.exporter.passes.half import HalfPrecision

    src = _tiny_graph(tmp_path / "tiny.onnx")
    model = ir.load(str(src))
    result = HalfPrecision(precision)(model)
    counts = result.details
    low = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}[precision]
    by_op = {n.op_type: n for n in model.graph}
    assert by_op["MatMul"].outputs[0].dtype == low and by_op["MatMul"].inputs[1].dtype == low
    assert by_op["LayerNormalization"].inputs[0].dtype == ir.DataType.FLOAT
    assert by_op["Softmax"].outputs[0].dtype == ir.DataType.FLOAT and by_op["Mul"].outputs[0].dtype == low
    assert [o.name for o in model.graph.outputs] == ["y"] and model.graph.outputs[0].dtype == ir.DataType.FLOAT
    assert counts["weights"] == 2 and "W" not in model.graph.initializers  # W and the constant 2, converted
    assert (counts["half_nodes"], counts["fp32_nodes"]) == (2, 2) == (result.rewritten, sum(result.skipped.values()))
    assert result.skipped == {"LayerNormalization stays fp32": 1, "Softmax stays fp32": 1}
    ir.save(model, str(tmp_path / "half.onnx"))
    onnx.checker.check_model(onnx.load(str(tmp_path / "half.onnx")), full_check=True)

    # The simulation: fp32 throughout, values rounded where the real graph holds them in half precision. For fp16
    # it must agree with onnxruntime running the real fp16 graph, and differ from the fp32 graph.
    sim = ir.load(str(src))
    HalfPrecision(precision, simulate=True)(sim)
    assert all(v.dtype in (ir.DataType.FLOAT, low, None) for n in sim.graph for v in n.outputs)
    ir.save(sim, str(tmp_path / "sim.onnx"))
    x = {"x": np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32) * 3}
    fp32 = ort.InferenceSession(str(src)).run(None, x)[0]
    simulated = ort.InferenceSession(str(tmp_path / "sim.onnx")).run(None, x)[0]
    assert 0 < np.abs(simulated - fp32).max() < (2e-3 if precision == "fp16" else 2e-2)
    if precision == "fp16":
        real = ort.InferenceSession(str(tmp_path / "half.onnx")).run(None, x)[0]
        np.testing.assert_allclose(simulated, real, atol=1e-3)
