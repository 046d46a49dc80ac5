"""Packed projections (passes/pack.py) on decoders exported from kiln's Llama and Qwen2 (q/k/v biases) references: five
MatMuls per layer become two and two Splits, and the outputs stay those of the unpacked graph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from conftest import decoder_feed, graph_ops, run_graph
from kiln.exporter.passes.pack import PackProjections

LAYERS = 2


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # Qwen2's q, k and v have biases
def test_packing_keeps_the_numbers(traced, model_type):
    path = traced(model_type, "text-generation") / "model.onnx"
    original, model = ir.load(str(path)), ir.load(str(path))
    before = graph_ops(original)
    assert before[("", "MatMul")] == 7 * LAYERS + 1 and before[("", "Split")] == 2 * LAYERS  # rotate_half's Splits
    result = PackProjections()(model)
    assert result.rewritten == 2 * LAYERS  # q|k|v and gate|up
    assert result.skipped == {"one projection reads the activation": 2 * LAYERS + 1}  # o, down, the head
    after = graph_ops(model)
    assert after[("", "MatMul")] == 4 * LAYERS + 1 and after[("", "Split")] == 4 * LAYERS
    assert len(model.graph.initializers) < len(original.graph.initializers)  # the separate weights are gone
    # Only the MatMuls are packed: Qwen2's q, k and v bias Adds stay, each reading its column block of the Split
    assert after[("", "Add")] == before[("", "Add")]
    bias_adds = [n for n in model.graph if n.op_type == "Add" and any(
        v is not None and v.producer() is not None and v.producer().name.endswith("_packed_split") for v in n.inputs)]
    assert len(bias_adds) == (3 * LAYERS if model_type == "qwen2" else 0)
    feed = decoder_feed(model.graph.inputs)
    for a, b in zip(run_graph(original, feed), run_graph(model, feed), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5)
