"""Every BERT-family task exports with one fused Attention node per layer and validates with task agreement."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

import kiln
from kiln.artifact import load_manifest
from kiln.cli.__main__ import main
from kiln.runtime.engines import group_outputs
from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine

AGREEMENT = {"feature-extraction": "min_cosine", "text-classification": "label_agreement",
             "token-classification": "token_agreement", "fill-mask": "token_agreement",
             "question-answering": "span_agreement"}


@pytest.mark.parametrize("family, task", [
    ("bert", "token-classification"), ("bert", "question-answering"), ("bert", "fill-mask"),
    ("roberta", "fill-mask"), ("xlm-roberta", "text-classification"), ("distilbert", "question-answering"),
    ("distilbert", "feature-extraction"),
])
def test_task_exports_and_validates(family, task, artifacts):
    out = artifacts(family, task)
    manifest = load_manifest(out)
    graph = onnx.load(str(out / "model.onnx")).graph
    assert Counter(n.op_type for n in graph.node)["Attention"] == 2
    assert manifest["validation"]["passed"]
    metric = AGREEMENT[task]
    assert manifest["validation"]["task"][metric] >= manifest["validation"]["task"]["gate"]
    names = [i.name for i in graph.input]
    assert ("token_type_ids" in names) == (family == "bert")


def test_hidden_states_and_attentions_as_outputs(checkpoints, tmp_path):
    path, theirs = checkpoints("bert", "text-classification")
    out = tmp_path / "art"
    assert main(["export", str(path), str(out), "--task", "text-classification", "--batch", "1:4",
                          "--seq", "1:32", "--output-hidden-states", "--output-attentions"]) == 0
    graph = onnx.load(str(out / "model.onnx")).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["Attention"] == 2 and "Softmax" not in ops  # probabilities come out of the fused node itself
    assert [o.name for o in graph.output] == ["logits", "hidden_states.0", "hidden_states.1", "hidden_states.2",
                                              "attentions.0", "attentions.1"]
    eager = type(theirs).from_pretrained(path, attn_implementation="eager").eval()
    ids = np.array([[2, 40, 41, 42, 3, 0], [2, 50, 3, 0, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    got = group_outputs(OnnxRuntimeEngine(out / "model.onnx").run(feed))
    with torch.no_grad():
        ref = eager(**{k: torch.from_numpy(v) for k, v in feed.items()}, output_hidden_states=True, output_attentions=True)
    assert len(got["hidden_states"]) == 3 and len(got["attentions"]) == 2
    for a, b in zip(got["hidden_states"] + got["attentions"], ref.hidden_states + ref.attentions):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-5)
    np.testing.assert_allclose(got["logits"], ref.logits.numpy(), atol=1e-5)
    assert json.loads((out / "kiln.json").read_text())["validation"]["outputs"]["attentions.1"]["max_abs"] < 1e-5
