"""DINOv2 exported: at the image processor's crop size (the position embeddings interpolated inside the graph), one
ONNX Attention node per layer, validated, equal to transformers; its image-classification pipeline equals
transformers'."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import kiln
from kiln.artifact import load_manifest
from kiln.errors import InputError
from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine
from conftest import VIT_LABELS, assert_same, make_dinov2_checkpoint

TASKS = ["feature-extraction", "image-classification"]


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    """(checkpoint, artifact) per task, exported once."""
    made = {}

    def get(task: str):
        if task not in made:
            root = tmp_path_factory.mktemp(f"dinov2-{task}")
            path, _ = make_dinov2_checkpoint(root / "checkpoint", task)
            kiln.export(str(path), root / "artifact", task=task, batch="1:8")
            made[task] = path, root / "artifact"
        return made[task]

    return get


def hf_model(task, path):
    import transformers

    cls = transformers.Dinov2ForImageClassification if task == "image-classification" else transformers.Dinov2Model
    return cls.from_pretrained(str(path), attn_implementation="eager").eval()


def graph_dims(onnx_path) -> dict:
    graph = onnx.load(str(onnx_path)).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*graph.input, *graph.output)}


@pytest.mark.parametrize("task", TASKS)
def test_export_at_the_crop_size_matches_transformers(task, dinov2):
    path, out = dinov2(task)
    ops = Counter(n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node)
    assert ops["Attention"] == 2 and "Softmax" not in ops  # two layers, each ONE standard ONNX Attention node
    dims = graph_dims(out / "model.onnx")
    # config.json says image_size 40; preprocessor_config.json crops 32: 4x4 patches + CLS
    assert dims["pixel_values"] == ["batch", 3, 32, 32]
    if task == "feature-extraction":
        assert dims["last_hidden_state"] == ["batch", 17, 32] and dims["pooler_output"] == ["batch", 32]
    else:
        assert dims["logits"] == ["batch", len(VIT_LABELS)]
    manifest = load_manifest(out)
    assert manifest["model_type"] == "dinov2" and manifest["validation"]["passed"]
    assert manifest["architecture"] == {"feature-extraction": "Dinov2Model",
                                        "image-classification": "Dinov2ForImageClassification"}[task]
    assert "preprocessor_config.json" in manifest["preprocessing_files"]

    engine, theirs = OnnxRuntimeEngine(out / "model.onnx"), hf_model(task, path)
    for batch in (1, 5):  # against transformers itself, which interpolates the positions from 5x5 to 4x4
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        got = engine.run({"pixel_values": x.numpy()})
        with torch.no_grad():
            want = theirs(pixel_values=x)
        for name in got:
            np.testing.assert_allclose(got[name], getattr(want, name).numpy(), atol=1e-4, err_msg=name)


def test_without_an_image_processor_the_config_size_is_exported(dinov2, tmp_path):
    path, _ = dinov2("feature-extraction")
    bare = tmp_path / "checkpoint"
    shutil.copytree(path, bare, ignore=shutil.ignore_patterns("preprocessor_config.json"))
    kiln.export(str(bare), tmp_path / "artifact", batch="1:2")
    dims = graph_dims(tmp_path / "artifact" / "model.onnx")
    assert dims["pixel_values"] == ["batch", 3, 40, 40] and dims["last_hidden_state"] == ["batch", 26, 32]


def test_export_with_attentions_keeps_one_node_per_layer(dinov2, tmp_path):
    path, _ = dinov2("image-classification")
    kiln.export(str(path), tmp_path / "artifact", task="image-classification", batch="1:4", output_attentions=True,
                output_hidden_states=True)
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "artifact" / "model.onnx")).graph.node)
    assert ops["Attention"] == 2 and "Softmax" not in ops
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    got = OnnxRuntimeEngine(tmp_path / "artifact" / "model.onnx").run({"pixel_values": x.numpy()})
    with torch.no_grad():
        want = hf_model("image-classification", path)(pixel_values=x, output_hidden_states=True,
                                                       output_attentions=True)
    np.testing.assert_allclose(got["logits"], want.logits.numpy(), atol=1e-4)
    for i in range(2):
        assert got[f"attentions.{i}"].shape == (3, 4, 17, 17)
        np.testing.assert_allclose(got[f"attentions.{i}"], want.attentions[i].numpy(), atol=1e-5)
    for i in range(3):
        np.testing.assert_allclose(got[f"hidden_states.{i}"], want.hidden_states[i].numpy(), atol=1e-4)


def test_image_classification_pipeline_matches_transformers(dinov2, tmp_path):
    import transformers

    path, out = dinov2("image-classification")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((40, 50, 3), (64, 36, 3), (30, 30, 3))]
    files = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    ours = kiln.pipeline("image-classification", out, batch_size=2)
    theirs = transformers.pipeline("image-classification", model=str(path), device="cpu")
    assert_same(ours(files, top_k=4), theirs(files, top_k=4))
    assert_same(ours(Image.open(files[1])), theirs(Image.open(files[1])))
    assert_same(ours(images[0]), theirs(images[0]))


def test_seq_range_is_refused(dinov2, tmp_path):
    path, _ = dinov2("feature-extraction")
    with pytest.raises(InputError, match=r"--seq does not apply.*image size \[32, 32\]"):
        kiln.export(str(path), tmp_path / "out", seq="1:16")
