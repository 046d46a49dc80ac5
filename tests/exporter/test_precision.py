"""--precision int8|int4: quantized graphs, their accuracy against fp32 recorded in kiln.json, and the gate."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest

import kiln
from kiln.artifact import load_manifest
from kiln.errors import InputError, ValidationError


def ops(path):
    return Counter(n.op_type for n in onnx.load(str(path / "model.onnx")).graph.node)


def test_real_minilm_int8_passes_its_gate(minilm_dir, tmp_path):
    manifest = kiln.export(minilm_dir, tmp_path / "int8", precision="int8", batch="1:16", seq="1:128")
    assert manifest["precision"] == "int8" and manifest["accuracy"]["passed"]
    assert manifest["accuracy"]["mean_cosine"] >= 0.99 and manifest["accuracy"]["inputs"] == 12
    counts = ops(tmp_path / "int8")
    assert counts["MatMulInteger"] > 0 and counts["Attention"] == 6 and "QAttention" not in counts
    assert (tmp_path / "int8" / "model.onnx").stat().st_size < 0.7 * 90e6  # fp32 MiniLM is ~87 MB
    vectors = kiln.pipeline("feature-extraction", tmp_path / "int8")(["a cat", "a dog"], pooling="mean")
    assert len(vectors[0]) == 384


def test_classifier_int8_records_label_agreement(checkpoints, tmp_path):
    path, _ = checkpoints("bert", "text-classification")
    manifest = kiln.export(str(path), tmp_path / "q", task="text-classification", precision="int8",
                           force_precision=True, batch="1:16", seq="1:64")
    assert set(manifest["accuracy"]) >= {"label_agreement", "gate", "passed"}
    assert load_manifest(tmp_path / "q")["accuracy"] == manifest["accuracy"]
    assert kiln.pipeline("text-classification", tmp_path / "q")("i love paris")[0]["label"] in {"NEGATIVE", "NEUTRAL", "POSITIVE"}


def test_decoder_int4_is_weight_only_and_gated(tmp_path, monkeypatch):
    import torch
    import transformers

    from kiln.exporter.passes import quantize as q

    config = transformers.AutoConfig.for_model("llama", vocab_size=97, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "ckpt")
    manifest = kiln.export(str(tmp_path / "ckpt"), tmp_path / "int4", task="text-generation", precision="int4",
                           force_precision=True, batch="1:16")
    counts = ops(tmp_path / "int4")
    assert counts["MatMulNBits"] > 0 and counts["Attention"] == 2
    assert "next_token_agreement" in manifest["accuracy"]
    # A gate the measurement cannot meet refuses the export and leaves nothing behind.
    monkeypatch.setitem(q.GATES, "next_token_agreement", 1.01)
    with pytest.raises(ValidationError, match="int4 is below its accuracy gate: next_token_agreement"):
        kiln.export(str(tmp_path / "ckpt"), tmp_path / "refused", task="text-generation", precision="int4", batch="1:16")
    assert not (tmp_path / "refused").exists()


def test_unknown_precision(checkpoints, tmp_path):
    path, _ = checkpoints("bert", "feature-extraction")
    with pytest.raises(InputError, match="--precision 'fp8' is not supported"):
        kiln.export(str(path), tmp_path / "x", precision="fp8")
