"""Packed projections (passes/pack.py) on a decoder exported from kiln's Llama reference: five MatMuls per layer
become two and two Splits, and the outputs stay those of the unpacked graph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from conftest import decoder_feed, graph_ops, run_graph
from kiln.exporter.passes.pack import PackProjections

LAYERS = 2


def test_packing_keeps_the_numbers(traced):
    path = traced("llama", "text-generation") / "model.onnx"
    original, model = ir.load(str(path)), ir.load(str(path))
    before = graph_ops(original)
    assert before[("", "MatMul")] == 7 * LAYERS + 1 and before[("", "Split")] == 2 * LAYERS  # rotate_half's Splits
    result = PackProjections()(model)
    assert result.rewritten == 2 * LAYERS  # q|k|v and gate|up
    assert result.skipped == {"one projection reads the activation": 2 * LAYERS + 1}  # o, down, the head
    after = graph_ops(model)
    assert after[("", "MatMul")] == 4 * LAYERS + 1 and after[("", "Split")] == 4 * LAYERS
    assert len(model.graph.initializers) < len(original.graph.initializers)  # the separate weights are gone
    feed = decoder_feed(model.graph.inputs)
    for a, b in zip(run_graph(original, feed), run_graph(model, feed), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5)
