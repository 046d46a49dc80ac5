"""RotaryEmbedding (passes/rotary.py) on a decoder exported from kiln's Llama reference: six nodes per rotated tensor
become one, the half-width caches are sliced once for all layers, outputs stay those of the traced graph, and
UnfuseRotary gives back the Mul/Add form with the same numbers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from conftest import decoder_feed, graph_ops, run_graph
from kiln.exporter.passes.rotary import FuseRotary, UnfuseRotary

LAYERS = 2


def test_fuse_then_unfuse_keeps_the_numbers(traced):
    path = traced("llama", "text-generation") / "model.onnx"
    original, model = ir.load(str(path)), ir.load(str(path))
    before = graph_ops(original)
    result = FuseRotary()(model)
    after = graph_ops(model)
    assert result.rewritten == 2 * LAYERS  # q and k of each layer
    assert after[("", "RotaryEmbedding")] == 2 * LAYERS
    assert after[("", "Neg")] == before[("", "Neg")] - 2 * LAYERS
    assert after[("", "Split")] == before[("", "Split")] - 2 * LAYERS
    assert after[("", "Slice")] == before[("", "Slice")] + 2  # cos and sin halved once, shared by every layer
    feed = decoder_feed(model.graph.inputs)
    want = run_graph(original, feed)
    for a, b in zip(want, run_graph(model, feed), strict=True):
        np.testing.assert_allclose(b, a, atol=2e-5)

    back = UnfuseRotary()(model)
    assert back.rewritten == 2 * LAYERS and graph_ops(model)[("", "RotaryEmbedding")] == 0
    assert graph_ops(model)[("", "Neg")] == before[("", "Neg")]
    for a, b in zip(want, run_graph(model, feed), strict=True):
        np.testing.assert_allclose(b, a, atol=2e-5)


def test_graphs_without_rotary_are_left_alone(traced):
    model = ir.load(str(traced("bert", "feature-extraction") / "model.onnx"))
    result = FuseRotary()(model)
    assert result.rewritten == 0 and not result.modified
    assert set(result.skipped) == {"not x * cos + rotate_half(x) * sin"}
