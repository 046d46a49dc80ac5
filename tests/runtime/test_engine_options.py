"""The onnxruntime session kiln's engine opens: which of onnxruntime's graph optimizers it turns off on the CPU."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from kiln.runtime.engines import onnxruntime as engine_module
from kiln.runtime.engines.onnxruntime import CPU_DISABLED_OPTIMIZERS, OnnxRuntimeEngine


def residual_layer_norm(path) -> None:
    """y = LayerNorm(x + skip): the pattern onnxruntime's SkipLayerNormFusion rewrites (every BERT sublayer ends so)."""
    C = 16
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), name) for name in ("gamma", "beta")]
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "skip"], ["sum"]),
         helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)],
        "residual", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4, C]) for n in ("x", "skip")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, C])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def optimized_ops(path, tmp_path, disabled) -> set[str]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    return {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}


def test_cpu_engine_keeps_add_and_layer_norm_apart(tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    residual_layer_norm(path)
    # The names are onnxruntime's own: without them it fuses, with them it does not (a misspelt name would be
    # ignored silently, so this is checked on onnxruntime itself).
    assert "SkipLayerNormalization" in optimized_ops(path, tmp_path, [])
    assert "SkipLayerNormalization" not in optimized_ops(path, tmp_path, list(CPU_DISABLED_OPTIMIZERS))

    opened = []
    real = engine_module.ort.InferenceSession

    def spy(*args, **kwargs):
        opened.append(kwargs.get("disabled_optimizers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module.ort, "InferenceSession", spy)
    engine = OnnxRuntimeEngine(path, threads=1)
    assert opened == [list(CPU_DISABLED_OPTIMIZERS)]
    x, skip = np.ones((2, 4, 16), np.float32), np.arange(128, dtype=np.float32).reshape(2, 4, 16)
    y = engine.run({"x": x, "skip": skip})["y"]
    s = x + skip
    expected = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-12)
    gamma, beta = (numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer)
    np.testing.assert_allclose(y, expected * gamma + beta, atol=1e-5)
