"""Export: one fused Attention node per layer, named dynamic axes, validation report, atomic artifact writes."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

import kiln
from kiln.artifact import load_manifest
from kiln.errors import ArtifactError, ExportError, InputError, ValidationError
from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("task", ["feature-extraction", "text-classification"])
def test_one_attention_node_per_layer_and_named_axes(model_type, task, artifacts):
    out = artifacts(model_type, task)
    graph = onnx.load(str(out / "model.onnx")).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["Attention"] == 2  # two layers, each ONE standard ONNX Attention node
    assert not {"Softmax", "MultiHeadAttention"} & set(ops)  # nothing decomposed, nothing contrib
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert ("token_type_ids" in dims) == (model_type == "bert")
    expected_out = {"feature-extraction": ("last_hidden_state", ["batch", "sequence", 32]),
                    "text-classification": ("logits", ["batch", 3])}[task]
    assert dims[expected_out[0]] == expected_out[1]


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("task", ["feature-extraction", "text-classification"])
def test_onnx_matches_reference_on_fresh_shapes(model_type, task, checkpoints, artifacts):
    """Beyond the exporter's own validation: new shapes, padded rows, against the kiln reference."""
    path, _ = checkpoints(model_type, task)
    reference = kiln.from_pretrained(str(path), task=task)
    engine = OnnxRuntimeEngine(artifacts(model_type, task) / "model.onnx")
    names = [i.name for i in engine.inputs()]
    rng = np.random.default_rng(1)
    for batch, seq in [(1, 1), (5, 11), (8, 64)]:
        ids = rng.integers(5, reference.config.vocab_size, size=(batch, seq))
        mask = np.ones_like(ids)
        mask[1::2, seq // 2 + 1:] = 0
        ids[mask == 0] = reference.config.pad_token_id
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        feed = {k: v for k, v in feed.items() if k in names}
        got = engine.run(feed)
        with torch.no_grad():
            ref = reference(**{k: torch.from_numpy(v) for k, v in feed.items()})
        for name, value in got.items():
            np.testing.assert_allclose(value, ref[name].numpy(), atol=1e-4, err_msg=f"{name} at {batch}x{seq}")


def test_manifest_records_source_validation_and_tokenizer(checkpoints, artifacts):
    from kiln import hub

    path, _ = checkpoints("bert", "text-classification")
    out = artifacts("bert", "text-classification")
    m = load_manifest(out)
    assert m["task"] == "text-classification" and m["model_type"] == "bert" and m["opset"] >= 23
    assert m["source"]["weights_sha256"] == hub.sha256_files([path / "model.safetensors"])
    assert m["validation"]["passed"] and m["validation"]["task"]["label_agreement"] == 1.0
    assert all(e["max_abs"] < 1e-4 for e in m["validation"]["outputs"].values())
    assert m["dynamic_axes"] == {"batch": {"min": 1, "max": 8}, "sequence": {"min": 1, "max": 64}}
    assert m["attention"] == {"lowering": "onnx-attention", "nodes": 2, "form": "onnx-3d", "rotary_nodes": 0}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    assert json.loads((out / "config.json").read_text()) == json.loads((path / "config.json").read_text())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


@pytest.fixture
def perturbed_trace(monkeypatch):
    """Make the traced graph really disagree with the reference: trace a copy whose weights carry noise."""
    import copy

    from kiln.exporter.trace import torch as trace_torch

    original = trace_torch.trace

    def noisy(model, spec, path, opset=23):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for p in twin.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        return original(twin, spec, path, opset)

    monkeypatch.setattr(trace_torch, "trace", noisy)


def test_validation_failure_leaves_no_artifact(checkpoints, tmp_path, perturbed_trace):
    path, _ = checkpoints("bert", "text-classification")
    out = tmp_path / "art"
    with pytest.raises(ValidationError, match=r"logits: max abs diff [0-9.e-]+ \(allowed [0-9.e-]+\)") as info:
        kiln.export(str(path), out, task="text-classification", batch="1:4", seq="1:16")
    assert info.value.report["passed"] is False
    assert list(tmp_path.iterdir()) == []  # neither the artifact nor a temp dir


def test_validation_failure_keeps_previous_artifact_and_failed_copy(checkpoints, artifacts, tmp_path, perturbed_trace):
    import shutil

    path, _ = checkpoints("bert", "text-classification")
    out = tmp_path / "art"
    shutil.copytree(artifacts("bert", "text-classification"), out)
    before = (out / "model.onnx").read_bytes()
    with pytest.raises(ValidationError):
        kiln.export(str(path), out, task="text-classification", batch="1:4", seq="1:16", keep_failed=True)
    assert (out / "model.onnx").read_bytes() == before and load_manifest(out)["validation"]["passed"]
    failed = load_manifest(tmp_path / "art.failed")
    assert failed["validation"]["passed"] is False


def test_refuses_to_replace_a_directory_that_is_not_an_artifact(checkpoints, tmp_path):
    path, _ = checkpoints("bert", "feature-extraction")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not a kiln artifact"):
        kiln.export(str(path), tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("options, error, message", [
    ({"opset": 17}, ExportError, "opset >= 23"),
    ({"batch": "8"}, InputError, "MIN:MAX"),
    ({"seq": "4:2"}, InputError, "MIN <= MAX"),
    ({"seq": "1:4096"}, InputError, "maximum sequence length 64"),
    ({"task": "image-classification"}, kiln.KilnError, "Supported tasks: feature-extraction, text-classification, token"),
])
def test_bad_export_options(options, error, message, checkpoints, tmp_path):
    path, _ = checkpoints("bert", "feature-extraction")
    with pytest.raises(error, match=message):
        kiln.export(str(path), tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_progress_is_reported_per_step(checkpoints, tmp_path, caplog):
    path, _ = checkpoints("roberta", "feature-extraction")
    with caplog.at_level("INFO", logger="kiln"):
        kiln.export(str(path), tmp_path / "out", batch="1:2", seq="1:16")
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[")]
    assert [s[:5] for s in steps] == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    assert "validation passed" in caplog.text
