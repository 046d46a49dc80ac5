"""3-D attention (passes/attention_3d.py) and its inverse on graphs exported from kiln's own references: node counts,
the same outputs in onnxruntime, and To4D restoring (B, H, T, D) attention with the same numbers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from conftest import decoder_feed, graph_ops, padded_feed, run_graph
from kiln.exporter.passes.attention_3d import DecoderAttention3D, To4D
from kiln.exporter.passes.attention_forms import EncoderAttention
from kiln.exporter.passes.rotary import FuseRotary

LAYERS = 2


@pytest.mark.parametrize("form", ["onnx-3d", "onnx-packed"])
def test_to_4d_undoes_the_encoder_3d_forms(traced, form):
    path = traced("bert", "feature-extraction") / "model.onnx"
    original, model = ir.load(str(path)), ir.load(str(path))
    EncoderAttention(form)(model)
    result = To4D()(model)
    assert result.rewritten == LAYERS
    for node in model.graph:
        if node.op_type == "Attention":
            assert "q_num_heads" not in node.attributes
            assert [v.producer().op_type for v in node.inputs[:3]] == ["Transpose"] * 3  # (B, H, T, D) again
    feed = padded_feed()
    mask = feed["attention_mask"].astype(bool)
    np.testing.assert_allclose(run_graph(model, feed)[0][mask], run_graph(original, feed)[0][mask], atol=2e-5)
    assert To4D()(model).skipped == {"it is already 4-D": LAYERS}  # nothing left to undo


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_decoder_attention_fed_3d_and_back(traced, model_type):
    path = traced(model_type, "text-generation") / "model.onnx"
    original, model = ir.load(str(path)), ir.load(str(path))
    FuseRotary()(model)
    before = graph_ops(model)
    result = DecoderAttention3D()(model)
    after = graph_ops(model)
    assert result.rewritten == LAYERS and not result.skipped
    # q, k, v lose their Reshape -> Transpose, the output its Transpose -> Reshape: 4 of each per layer; Qwen3's
    # q and k keep their Reshape to heads for the per-head norm and gain one back to (B, T, C)
    assert after[("", "Transpose")] == before[("", "Transpose")] - 4 * LAYERS
    kept = 2 * 2 * LAYERS if model_type == "qwen3" else 0
    assert after[("", "Reshape")] == before[("", "Reshape")] - 4 * LAYERS + kept
    attention = [n for n in model.graph if n.op_type == "Attention"]
    assert len(attention) == LAYERS
    assert all(n.attributes.get_int("q_num_heads", 0) == 4 and n.attributes.get_int("kv_num_heads", 0) == 2
               for n in attention)
    rotary = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    assert sorted(n.attributes.get_int("num_heads", 0) for n in rotary) == [2, 2, 4, 4]  # k and q of two layers
    feed = decoder_feed(model.graph.inputs)
    want = run_graph(original, feed)
    for a, b in zip(want, run_graph(model, feed), strict=True):
        np.testing.assert_allclose(b, a, atol=2e-5)
    assert To4D()(model).rewritten == LAYERS
    assert graph_ops(model)[("", "Transpose")] == before[("", "Transpose")]
    assert not any("num_heads" in n.attributes for n in model.graph if n.op_type == "RotaryEmbedding")
    for a, b in zip(want, run_graph(model, feed), strict=True):
        np.testing.assert_allclose(b, a, atol=2e-5)


def test_decoder_3d_needs_the_fused_rotary_and_a_cache(traced):
    decoder = ir.load(str(traced("llama", "text-generation") / "model.onnx"))
    result = DecoderAttention3D()(decoder)  # rotate_half still as Mul/Add: not the pattern
    assert result.rewritten == 0 and result.skipped == {"q or k is not rotated by one plain RotaryEmbedding node": 2}
    encoder = ir.load(str(traced("bert", "feature-extraction") / "model.onnx"))
    assert DecoderAttention3D()(encoder).skipped == {"it has no KV cache": LAYERS}
