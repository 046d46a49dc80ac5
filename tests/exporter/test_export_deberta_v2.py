"""DeBERTa-v2/v3 artifacts: one fused Attention node per layer (the relative terms as its additive mask), validated,
int8 gated, and pipelines equal to transformers.pipeline on the same weights."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
from conftest import assert_same, make_deberta

import kiln
from kiln.artifact import load_manifest

TEXTS = ["the movie was terrible", "paris is the capital city of france and the river runs through it", "a"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, artifact) per (variant, task, precision), exported once."""
    cache = {}

    def get(task: str, variant: str = "v3", precision: str = "fp32"):
        key = (task, variant, precision)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"deberta-{variant}-{task}")
            path, _ = make_deberta(root / "checkpoint", task, variant)
            kiln.export(str(path), root / "artifact", task=task, batch="1:8", seq="1:64", precision=precision)
            cache[key] = (path, root / "artifact")
        return cache[key]

    return get


def hf(task, path):
    import transformers

    return transformers.pipeline(task, model=str(path), device="cpu")


@pytest.mark.parametrize("variant,task", [("v3", "text-classification"), ("v3", "token-classification"),
                                          ("v3", "fill-mask"), ("v3", "question-answering"),
                                          ("v2", "feature-extraction")])
def test_exports_with_one_attention_node_per_layer(exported, variant, task):
    _, out = exported(task, variant)
    manifest = load_manifest(out)
    assert manifest["validation"]["passed"]
    graph = onnx.load(str(out / "model.onnx")).graph
    assert Counter(n.op_type for n in graph.node)["Attention"] == 2
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"] + (["token_type_ids"] if variant == "v2" else [])


def test_text_classification_and_zero_shot_match_transformers(exported):
    path, out = exported("text-classification")
    assert_same(kiln.pipeline("text-classification", out)(TEXTS, top_k=None),
                hf("text-classification", path)(TEXTS, top_k=None))
    # DeBERTa-v3 NLI checkpoints are today's zero-shot classifiers: the same artifact runs it
    labels = ["movie", "city", "river"]
    assert_same(kiln.pipeline("zero-shot-classification", out)(TEXTS, candidate_labels=labels),
                hf("zero-shot-classification", path)(TEXTS, candidate_labels=labels))


def test_token_classification_and_fill_mask_match_transformers(exported):
    path, out = exported("token-classification")
    theirs = hf("token-classification", path)(TEXTS[1], ignore_labels=[])
    assert_same(kiln.pipeline("token-classification", out)(TEXTS[1], ignore_labels=[]),
                [{k: float(v) if k == "score" else v for k, v in e.items()} for e in theirs])
    path, out = exported("fill-mask")
    masked = "the capital of france is [MASK]."
    assert_same(kiln.pipeline("fill-mask", out)(masked, top_k=3), hf("fill-mask", path)(masked, top_k=3))


def test_int8_passes_its_gate(exported):
    path, out = exported("text-classification", precision="int8")
    manifest = load_manifest(out)
    assert manifest["precision"] == "int8" and manifest["accuracy"]["passed"]
    ops = Counter(n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node)
    assert ops["Attention"] == 2 and (ops["MatMulInteger"] or ops["DynamicQuantizeMatMul"] or ops["QLinearMatMul"])
