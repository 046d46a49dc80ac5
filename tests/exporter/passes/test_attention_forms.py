"""The encoder attention forms (passes/attention_forms.py) on graphs exported from kiln's own references: the node
counts each form promises, in onnxruntime the same outputs as the traced graph on padded batches, and the reasons
a layer is left alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import kiln
from kiln.exporter.passes.attention_forms import FORMS, EncoderAttention

LAYERS = 2


from conftest import graph_ops as ops
from conftest import padded_feed
from conftest import run_graph as run


@pytest.mark.parametrize("model_type,task", [("bert", "feature-extraction"), ("roberta", "text-classification"),
                                             ("distilbert", "token-classification"), ("bert", "question-answering")])
@pytest.mark.parametrize("form", FORMS[1:])
def test_forms_compute_the_same_function(traced, model_type, task, form):
    path = traced(model_type, task) / "model.onnx"
    original, model = ir.load(str(path)), ir.load(str(path))
    result = EncoderAttention(form)(model)
    assert (result.rewritten, sum(result.skipped.values()), result.modified) == (LAYERS, 0, True)
    before, after = ops(original), ops(model)
    if form == "decomposed":
        assert after[("", "Attention")] == 0 and after[("", "Softmax")] == LAYERS
        assert after[("", "MatMul")] == before[("", "MatMul")] + 2 * LAYERS  # q k^T and probs v
        assert after[("", "Transpose")] == before[("", "Transpose")] + LAYERS  # k^T
    elif form == "contrib":
        assert after[("com.microsoft", "Attention")] == LAYERS and after[("", "Attention")] == 0
        assert after[("", "MatMul")] == before[("", "MatMul")] - 3 * LAYERS  # projections inside the op
    elif form == "contrib-mha":
        assert after[("com.microsoft", "MultiHeadAttention")] == LAYERS and after[("", "Attention")] == 0
        assert after[("", "MatMul")] == before[("", "MatMul")]  # q, k, v keep their MatMuls; their biases go inside
        assert after[("", "Add")] == before[("", "Add")] - 3 * LAYERS
    else:
        assert after[("", "Attention")] == LAYERS
        packed = form == "onnx-packed"
        assert after[("", "MatMul")] == before[("", "MatMul")] - (2 * LAYERS if packed else 0)
        assert after[("", "Split")] == (LAYERS if packed else 0)
    if form != "decomposed":  # the four Reshape/Transpose pairs around each layer's attention are gone
        assert after[("", "Transpose")] == before[("", "Transpose")] - 4 * LAYERS
    feed = padded_feed()
    mask = feed["attention_mask"].astype(bool)
    for want, got in zip(run(original, feed), run(model, feed)):
        valid = mask if want.ndim == 3 or (want.ndim == 2 and want.shape == mask.shape) else np.ones(want.shape[0], bool)
        np.testing.assert_allclose(got[valid], want[valid], atol=2e-5)


def test_attention_with_probabilities_or_a_cache_is_kept(tmp_path, checkpoints):
    path, _ = checkpoints("bert", "feature-extraction")
    kiln.export(str(path), tmp_path / "probs", output_attentions=True, batch="1:4", seq="1:32")
    model = ir.load(str(tmp_path / "probs" / "model.onnx"))
    result = EncoderAttention("contrib")(model)
    assert (result.rewritten, result.modified) == (0, False)
    assert result.skipped == {"its presents or probabilities are used": LAYERS}
    from conftest import TINY_LLAMA, make_causal_lm

    make_causal_lm(tmp_path / "llama", "llama", **TINY_LLAMA)
    kiln.export(str(tmp_path / "llama"), tmp_path / "decoder", task="text-generation", batch="1:4", attention="onnx")
    decoder = ir.load(str(tmp_path / "decoder" / "model.onnx"))
    result = EncoderAttention("onnx-packed")(decoder)
    assert result.rewritten == 0 and result.skipped == {"it has a KV cache or extra inputs": LAYERS}


def test_unknown_form():
    with pytest.raises(ValueError, match="choose one of onnx-3d, onnx-packed, contrib, contrib-mha, decomposed"):
        EncoderAttention("fused")


@pytest.mark.parametrize("form,op", [("contrib", "Attention"), ("contrib-mha", "MultiHeadAttention")])
def test_export_in_a_form_validates_records_it_and_tensorrt_refuses_it(checkpoints, tmp_path, form, op):
    import json

    from kiln.errors import ExportError, InputError
    from kiln.exporter.tensorrt import _lower

    path, _ = checkpoints("bert", "text-classification")
    manifest = kiln.export(str(path), tmp_path / form, task="text-classification", attention=form,
                           batch="1:8", seq="1:32")
    assert manifest["validation"]["passed"] and manifest["attention"]["form"] == form
    assert manifest["op_counts"][op] == LAYERS and "Transpose" not in manifest["op_counts"]
    labels = kiln.pipeline("text-classification", tmp_path / form)(["i love paris", "so bad"])
    assert len(labels) == 2
    with pytest.raises(ExportError, match=f"com.microsoft.{op} .*Re-export with --attention onnx"):
        _lower(tmp_path / form, json.loads((tmp_path / form / "kiln.json").read_text()), tmp_path, "10.14.1", True)
    with pytest.raises(InputError, match="--attention 'fused'"):
        kiln.export(str(path), tmp_path / "x", attention="fused")
