"""logits_to_keep (passes/logits.py): a decoder graph takes it as an input with a default of 0 (every position) and
k returns the last k positions' logits, equal to the same rows of a full run; encoders have no LM head to slice."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from conftest import decoder_feed, run_graph
from kiln.exporter.passes.logits import NAME, KeepLastLogits


def test_keep_last_logits(traced, tmp_path):
    model = ir.load(str(traced("llama", "text-generation") / "model.onnx"))  # exported with the pass already
    assert NAME in [v.name for v in model.graph.inputs]
    assert KeepLastLogits()(model).skipped == {f"the graph already takes {NAME}": 1}
    feed = decoder_feed(model.graph.inputs, seq=5)
    ir.save(model, str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    full = session.run(["logits"], feed)[0]
    assert full.shape[1] == 5  # the default: every position
    for k in (1, 3):
        kept = session.run(["logits"], {**feed, NAME: np.array(k, np.int64)})[0]
        np.testing.assert_allclose(kept, full[:, -k:], atol=1e-6)


def test_the_pass_adds_the_input_and_three_nodes(traced):
    model = ir.load(str(traced("llama", "text-generation") / "model.onnx"))
    # Undo what the export did: the head reads the hidden states directly again.
    sliced = next(n for n in model.graph if n.name == f"{NAME}_slice")
    head = sliced.outputs[0].uses()[0].node
    head.replace_input_with(0, sliced.inputs[0])
    for name in (f"{NAME}_slice", f"{NAME}_starts", f"{NAME}_neg"):
        model.graph.remove(next(n for n in model.graph if n.name == name), safe=True)
    model.graph.inputs.remove(next(v for v in model.graph.inputs if v.name == NAME))
    for name in (NAME, f"{NAME}_axes0", f"{NAME}_ends", f"{NAME}_axes"):
        del model.graph.initializers[name]
    count = len(model.graph)
    feed = decoder_feed(model.graph.inputs)
    want = run_graph(model, feed)
    result = KeepLastLogits()(model)
    assert result.rewritten == 1 and len(model.graph) == count + 3  # Neg, Unsqueeze, Slice
    for a, b in zip(want, run_graph(model, feed), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-6)


def test_encoders_are_left_alone(traced):
    model = ir.load(str(traced("bert", "feature-extraction") / "model.onnx"))
    assert KeepLastLogits()(model).skipped == {"'logits' is not a product of (batch, sequence, hidden) states": 1}
