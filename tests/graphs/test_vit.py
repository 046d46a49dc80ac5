"""ViT: the kiln reference vs transformers, save_pretrained round trips, the export (one Attention node per layer)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

import kiln
from kiln.artifact import load_manifest
from kiln.cli.__main__ import main
from kiln.errors import CheckpointError, ConfigError, InputError
from kiln.graphs.vit.config import ViTConfig
from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine
from conftest import VIT_LABELS, make_vit_checkpoint

TASKS = ["image-classification", "feature-extraction"]
OUTPUTS = {"image-classification": ["logits"], "feature-extraction": ["last_hidden_state", "pooler_output"]}


def hf_model(task, path):
    """transformers returns attentions only from its eager implementation."""
    import transformers

    cls = transformers.ViTForImageClassification if task == "image-classification" else transformers.ViTModel
    return cls.from_pretrained(str(path), attn_implementation="eager").eval()


def pixels(batch, height=32, width=32, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def assert_matches(ours, theirs, x, names, atol=1e-5):
    with torch.no_grad():
        a = ours(x, output_hidden_states=True, output_attentions=True)
        b = theirs(pixel_values=x, output_hidden_states=True, output_attentions=True)
    for name in names:
        torch.testing.assert_close(a[name], getattr(b, name), atol=atol, rtol=0, msg=name)
    assert len(a["hidden_states"]) == len(b.hidden_states) and len(a["attentions"]) == len(b.attentions)
    for kind in ("hidden_states", "attentions"):
        for i, (p, q) in enumerate(zip(a[kind], getattr(b, kind))):
            torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=f"{kind}.{i}")


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("task", TASKS)
def test_reference_matches_transformers(task, attn_impl, vit_checkpoints):
    path, _ = vit_checkpoints(task)
    ours = kiln.from_pretrained(str(path), task=task, attn_impl=attn_impl)
    assert_matches(ours, hf_model(task, path), pixels(3), OUTPUTS[task])
    with torch.no_grad():
        assert set(ours(pixels(1))) == set(OUTPUTS[task]), "hidden states and attentions only on request"


@pytest.mark.parametrize("task", TASKS)
def test_variant_config_matches_transformers(task, tmp_path):
    """No q/k/v bias, a non-square image, tanh-approximated GELU, a pooler of another width and activation."""
    overrides = dict(qkv_bias=False, image_size=[32, 16], hidden_act="gelu_new", pooler_output_size=24,
                     pooler_act="relu")
    path, _ = make_vit_checkpoint(tmp_path, task, seed=3, **overrides)
    ours = kiln.from_pretrained(str(path), task=task)
    assert ours.config.sequence_length == 1 + 4 * 2
    assert_matches(ours, hf_model(task, path), pixels(2, 32, 16), OUTPUTS[task])


def test_classification_checkpoint_as_feature_extractor(vit_checkpoints):
    """The encoder of a task checkpoint, without a pooler (it has none): transformers' ViTModel hidden states."""
    path, _ = vit_checkpoints("image-classification")
    ours = kiln.from_pretrained(str(path), task="feature-extraction")
    assert ours.pooler is None
    theirs = hf_model("feature-extraction", path)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels(2))["last_hidden_state"], theirs(pixels(2)).last_hidden_state,
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", TASKS)
def test_save_pretrained_round_trip(task, vit_checkpoints, tmp_path):
    path, _ = vit_checkpoints(task)
    ours = kiln.from_pretrained(str(path), task=task)
    ours.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "model.safetensors")) == set(load_file(path / "model.safetensors"))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == [{"image-classification": "ViTForImageClassification",
                                       "feature-extraction": "ViTModel"}[task]]
    theirs = hf_model(task, tmp_path)
    assert_matches(ours, theirs, pixels(2, seed=1), OUTPUTS[task])


def test_other_image_sizes_are_refused(vit_checkpoints):
    model = kiln.from_pretrained(str(vit_checkpoints()[0]), task="image-classification")
    with pytest.raises(InputError, match="resize images to 32x32"):
        model(pixels(1, 48, 48))


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 5}, "divisible"),
    ({"patch_size": 64}, "larger than 'image_size'"),
    ({"image_size": [32]}, "'image_size'"),
    ({"hidden_act": "mish"}, "'hidden_act'"),
    ({"id2label": ["cat"]}, "'id2label'"),
])
def test_bad_configs_name_the_field(change, message):
    raw = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 37, "image_size": 32, "patch_size": 8, **change}
    with pytest.raises(ConfigError, match=message):
        ViTConfig.from_dict(raw)


def test_missing_weight_and_unknown_task(vit_checkpoints, tmp_path):
    path, _ = vit_checkpoints("image-classification")
    with pytest.raises(ConfigError, match="image-classification, feature-extraction"):
        kiln.from_pretrained(str(path), task="text-classification")
    state = load_file(path / "model.safetensors")
    del state["classifier.weight"]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="classifier.weight"):
        kiln.from_pretrained(str(tmp_path), task="image-classification")


def attention_node_count(onnx_path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(onnx_path)).graph.node)


def graph_dims(onnx_path) -> dict:
    graph = onnx.load(str(onnx_path)).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*graph.input, *graph.output)}


def test_export_image_classification(vit_checkpoints, vit_artifacts):
    out = vit_artifacts("image-classification")
    ops = attention_node_count(out / "model.onnx")
    assert ops["Attention"] == 2 and "Softmax" not in ops  # two layers, each ONE standard ONNX Attention node
    dims = graph_dims(out / "model.onnx")
    assert dims == {"pixel_values": ["batch", 3, 32, 32], "logits": ["batch", len(VIT_LABELS)]}
    m = load_manifest(out)
    assert m["model_type"] == "vit" and m["task"] == "image-classification" and m["max_sequence_length"] is None
    assert m["dynamic_axes"] == {"batch": {"min": 1, "max": 8}}
    assert m["validation"]["passed"] and m["validation"]["task"]["label_agreement"] == 1.0
    assert "preprocessor_config.json" in m["preprocessing_files"] and (out / "preprocessor_config.json").is_file()

    reference = kiln.from_pretrained(str(vit_checkpoints("image-classification")[0]), task="image-classification")
    engine = OnnxRuntimeEngine(out / "model.onnx")
    for batch in (1, 5, 8):  # fresh batch sizes, beyond the exporter's own validation
        x = pixels(batch, seed=batch)
        with torch.no_grad():
            want = reference(x)["logits"].numpy()
        np.testing.assert_allclose(engine.run({"pixel_values": x.numpy()})["logits"], want, atol=1e-4)


def test_export_feature_extraction_with_pooler(vit_artifacts):
    out = vit_artifacts("feature-extraction")
    assert attention_node_count(out / "model.onnx")["Attention"] == 2
    dims = graph_dims(out / "model.onnx")
    assert dims["last_hidden_state"] == ["batch", 17, 32] and dims["pooler_output"] == ["batch", 32]
    validation = load_manifest(out)["validation"]
    assert validation["passed"] and validation["task"]["min_cosine"] >= 0.9999  # mean pooling over every token


def test_cli_export_with_attentions_keeps_one_node_per_layer(vit_checkpoints, tmp_path):
    path, _ = vit_checkpoints("image-classification")
    out = tmp_path / "vit-attn"
    assert main(["export", str(path), str(out), "--task", "image-classification", "--batch", "1:4",
                 "--output-attentions", "--output-hidden-states"]) == 0
    ops = attention_node_count(out / "model.onnx")
    assert ops["Attention"] == 2 and "Softmax" not in ops  # probabilities come out of the fused node itself
    engine = OnnxRuntimeEngine(out / "model.onnx")
    assert [o.name for o in engine.outputs()] == ["logits", "hidden_states.0", "hidden_states.1", "hidden_states.2",
                                                  "attentions.0", "attentions.1"]
    x = pixels(3, seed=7)
    got = engine.run({"pixel_values": x.numpy()})
    with torch.no_grad():
        want = hf_model("image-classification", path)(pixel_values=x, output_hidden_states=True, output_attentions=True)
    np.testing.assert_allclose(got["logits"], want.logits.numpy(), atol=1e-4)
    for i in range(2):
        np.testing.assert_allclose(got[f"attentions.{i}"], want.attentions[i].numpy(), atol=1e-5)
        assert got[f"attentions.{i}"].shape == (3, 4, 17, 17)
    for i in range(3):
        np.testing.assert_allclose(got[f"hidden_states.{i}"], want.hidden_states[i].numpy(), atol=1e-4)


def test_seq_range_is_refused(vit_checkpoints, tmp_path):
    path, _ = vit_checkpoints("image-classification")
    with pytest.raises(InputError, match="--seq does not apply to ViT"):
        kiln.export(str(path), tmp_path / "out", task="image-classification", seq="1:16")
    assert not (tmp_path / "out").exists()
