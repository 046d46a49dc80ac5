"""LowerForTensorRT / DecomposePlugin on graphs exported from kiln's own references: node counts after lowering, and in
onnxruntime the lowered graph (plugin nodes replaced by their reference decomposition) equals the exported one."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import transformers
from onnx import helper

import kiln
from conftest import graph_ops as ops
from kiln.errors import ExportError
from kiln.exporter.passes.attention_3d import To4D
from kiln.exporter.passes.cache_in_place import CacheConcat
from kiln.exporter.passes.lower_attention import DecomposePlugin, LowerForTensorRT
from kiln.exporter.specs import decoder_feed
from kiln.exporter.tensorrt import _lower, precision_plan
from kiln.kernels.attention import trt_plugin

LAYERS, HEADS, KV_HEADS, DIM, VOCAB = 2, 4, 2, 16, 100  # head dim 16: the smallest the kernel takes


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """A tiny grouped-query Llama, exported with kiln: (artifact dir, feed maker)."""
    root = tmp_path_factory.mktemp("llama-trt")
    config = transformers.AutoConfig.for_model(
        "llama", hidden_size=HEADS * DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, intermediate_size=37, vocab_size=VOCAB, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(root / "checkpoint")
    kiln.export(str(root / "checkpoint"), root / "artifact", task="text-generation", batch="1:4")
    return root / "artifact"


def load(artifact) -> ir.Model:
    """The exported graph with its KV cache concatenated again (the export writes it in place; ``CacheConcat``, kiln
    build's first pass, is checked against the graph before ``CacheInPlace`` in test_cache_in_place.py)."""
    model = ir.load(str(artifact / "model.onnx"))
    CacheConcat()(model)  # an encoder has nothing of it
    return model


def as_4d(artifact) -> ir.Model:
    """The graph as ``kiln build`` hands it to the lowering: the exported decoder feeds attention (B, T, C)
    (``DecoderAttention3D``); TensorRT's side takes (B, H, T, D), so ``To4D`` first, as kiln build's plan does."""
    model = load(artifact)
    assert To4D()(model).rewritten == LAYERS
    return model


def lower(model: ir.Model, **options) -> dict:
    """LowerForTensorRT's counts: encoder nodes kept, decoder nodes lowered to the plugin, decoder nodes skipped."""
    return LowerForTensorRT(**options)(model).details


def session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString())


def make_feed(names, sizes, seed=0):
    class Config:
        num_hidden_layers, num_key_value_heads, head_dim, vocab_size = LAYERS, KV_HEADS, DIM, VOCAB

    return decoder_feed(Config, names)(sizes, np.random.default_rng(seed))


def test_decoder_attention_becomes_concat_and_the_plugin(decoder):
    model = as_4d(decoder)
    before = ops(model)
    counts = lower(model, aot=True)
    after = ops(model)
    assert counts == {"kept": 0, "plugin": LAYERS, "skipped": 0}
    assert after[("", "Attention")] == 0 and after[("kiln", "attention_kv")] == LAYERS
    assert after[("", "Concat")] == before[("", "Concat")] + 2 * LAYERS  # a present key and value per layer
    # the key ranges are computed once, from the mask every layer shares
    assert after[("", "ArgMax")] == 1 and after[("", "ReduceSum")] == before[("", "ReduceSum")] + 1
    assert model.opset_imports["kiln"] == 1
    plugin = next(n for n in model.graph if n.domain == "kiln")
    assert plugin.attributes["aot"].value == 1 and plugin.attributes["plugin_namespace"].value == "kiln"
    assert (plugin.attributes["num_heads"].value, plugin.attributes["kv_heads"].value) == (HEADS, KV_HEADS)
    assert plugin.attributes["scale"].value == pytest.approx(DIM ** -0.5)
    # graph outputs keep their names, now produced by the Concats
    assert [v.name for v in model.graph.outputs] == [v.name for v in load(decoder).graph.outputs]
    assert model.graph.outputs[1].producer().op_type == "Concat"
    onnx.checker.check_model(ir.serde.serialize_model(model))


@pytest.mark.parametrize("sizes", [{"batch": 1, "sequence": 7, "past_sequence": 0},  # prefill
                                   {"batch": 3, "sequence": 1, "past_sequence": 20},  # decode, padded rows
                                   {"batch": 2, "sequence": 16, "past_sequence": 5},  # prefill after a prefix
                                   {"batch": 1, "sequence": 1, "past_sequence": 0}])
def test_lowered_then_decomposed_equals_the_export(decoder, sizes):
    original = session(load(decoder))
    lowered = as_4d(decoder)
    lower(lowered)
    assert DecomposePlugin()(lowered).rewritten == LAYERS and "kiln" not in lowered.opset_imports
    names = [i.name for i in original.get_inputs()]
    feed = make_feed(names, sizes)
    want, got = original.run(None, feed), session(lowered).run(None, feed)
    for name, a, b in zip([o.name for o in original.get_outputs()], want, got, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5, err_msg=name)


def test_left_padded_queries_differ_only_where_nothing_is_read(decoder):
    """Rows of left-padding queries see no key: the kernel gives zeros where the export averaged every key. Logits
    and caches at real tokens are unchanged."""
    original = session(load(decoder))
    lowered = as_4d(decoder)
    lower(lowered)
    DecomposePlugin()(lowered)
    names = [i.name for i in original.get_inputs()]
    feed = make_feed(names, {"batch": 2, "sequence": 12, "past_sequence": 0})
    feed["attention_mask"][1, :7] = 0
    feed["position_ids"] = np.clip(feed["attention_mask"].cumsum(-1) - 1, 0, None)
    want, got = original.run(None, feed), session(lowered).run(None, feed)
    real = feed["attention_mask"].astype(bool)  # (B, S), S == T here
    np.testing.assert_allclose(got[0][real], want[0][real], atol=1e-5, rtol=1e-5)
    for a, b in zip(want[1:], got[1:], strict=True):  # presents (B, Hkv, S, D): compare real positions
        np.testing.assert_allclose(b.transpose(0, 2, 1, 3)[real], a.transpose(0, 2, 1, 3)[real], atol=1e-5, rtol=1e-5)


def test_sliding_window_is_a_logged_bail_out(decoder, caplog):
    model = as_4d(decoder)
    with caplog.at_level(logging.WARNING, logger="kiln"):
        counts = lower(model, sliding_window=8)
    assert counts == {"kept": 0, "plugin": 0, "skipped": LAYERS}
    assert ops(model)[("", "Attention")] == LAYERS and "kiln" not in model.opset_imports
    assert caplog.text.count("sliding-window") == LAYERS


def test_encoder_attention_stays_for_tensorrt(artifacts):
    model = load(artifacts("bert", "feature-extraction"))
    before = ops(model)
    assert lower(model) == {"kept": 2, "plugin": 0, "skipped": 0}
    assert ops(model) == before


def synthetic_decoder_attention(head_dim: int) -> ir.Model:
    """One opset-23 Attention node with past inputs and present outputs, of a given head dim."""
    f32 = onnx.TensorProto.FLOAT
    shapes = {"q": ["B", 4, "T", head_dim], "k": ["B", 2, "T", head_dim], "v": ["B", 2, "T", head_dim],
              "pk": ["B", 2, "P", head_dim], "pv": ["B", 2, "P", head_dim]}
    inputs = [helper.make_tensor_value_info(n, f32, s) for n, s in shapes.items()]
    inputs.insert(3, helper.make_tensor_value_info("mask", onnx.TensorProto.BOOL, ["B", 1, "T", "S"]))
    node = helper.make_node("Attention", ["q", "k", "v", "mask", "pk", "pv"], ["y", "prk", "prv"], name="attn")
    outputs = [helper.make_tensor_value_info(n, f32, None) for n in ("y", "prk", "prv")]
    graph = helper.make_graph([node], "g", inputs, outputs)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))


def test_head_dim_the_kernel_cannot_take_is_a_logged_bail_out(caplog):
    with caplog.at_level(logging.WARNING, logger="kiln"):
        assert lower(synthetic_decoder_attention(8))["skipped"] == 1
    assert "head dim 8 is not a power of two in [16, 256]" in caplog.text
    model = synthetic_decoder_attention(32)
    assert lower(model)["plugin"] == 1
    plugin = next(n for n in model.graph if n.op_type == trt_plugin.PLUGIN_NAME)
    assert plugin.attributes["scale"].value == pytest.approx(32 ** -0.5)  # the node had no scale: 1/sqrt(D)
    assert "aot" not in plugin.attributes


def test_build_lowers_into_a_temporary_graph_and_checks_the_tensorrt_version(decoder, tmp_path):
    """kiln build's graph step (no TensorRT needed): the artifact's model.onnx stays as exported; the lowered copy
    carries the plugin nodes with aot=1 on TensorRT >= 10.9, and no aot attribute before."""
    manifest = json.loads((decoder / "kiln.json").read_text())
    for version, aot, expected in (("10.14.1.48", True, 1), ("10.7.0.23", None, None)):
        lowered, counts = _lower(decoder, manifest, tmp_path, version, aot)
        assert counts == {"kept": 0, "plugin": LAYERS, "skipped": 0}
        plugin = next(n for n in ir.load(str(lowered)).graph if n.domain == "kiln")
        assert not any(n.op_type == "RotaryEmbedding" for n in ir.load(str(lowered)).graph)  # unfused for TensorRT
        assert (plugin.attributes["aot"].value if "aot" in plugin.attributes else None) == expected
    assert ops(ir.load(str(decoder / "model.onnx")))[("com.microsoft", "GroupQueryAttention")] == LAYERS  # untouched
    with pytest.raises(ExportError, match="decoders need TensorRT >= 10.6"):
        _lower(decoder, manifest, tmp_path, "10.5.0", None)


def test_build_refuses_a_sliding_window_decoder(decoder, tmp_path):
    artifact = tmp_path / "mistral-like"
    shutil.copytree(decoder, artifact)
    config = json.loads((artifact / "config.json").read_text())
    (artifact / "config.json").write_text(json.dumps({**config, "model_type": "mistral", "sliding_window": 16}))
    with pytest.raises(ExportError, match="2 decoder attention node\\(s\\) could not be lowered"):
        _lower(artifact, json.loads((artifact / "kiln.json").read_text()), tmp_path, "10.14.1", True)


def test_encoders_need_tensorrt_10_14_for_onnx_attention(artifacts, tmp_path):
    artifact = artifacts("bert", "feature-extraction")
    manifest = json.loads((artifact / "kiln.json").read_text())
    assert _lower(artifact, manifest, tmp_path, "10.14.1", True)[1] == {"kept": 2, "plugin": 0, "skipped": 0}
    with pytest.raises(ExportError, match="cannot parse the ONNX Attention op \\(TensorRT >= 10.14 can\\)"):
        _lower(artifact, manifest, tmp_path, "10.13.0", True)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_build_types_the_graph_for_a_strongly_typed_network(decoder, tmp_path, precision):
    """fp16/bf16 builds: after the attention lowering the graph pass types matrix products and the plugin in 16 bits,
    keeps RMSNormalization fp32, and the graph's inputs and outputs stay as exported."""
    manifest = json.loads((decoder / "kiln.json").read_text())
    lowered, counts = _lower(decoder, manifest, tmp_path, "10.14.1", True, precision_plan(precision))
    low = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}[precision]
    assert counts["plugin"] == LAYERS and counts["precision"]["half_nodes"] > 0
    model = ir.load(str(lowered))
    seen = Counter()
    for node in model.graph:
        if node.op_type == "MatMul":
            assert node.inputs[1].dtype == low and node.outputs[0].dtype == low
        if node.op_type == "RMSNormalization":
            assert node.inputs[0].dtype == ir.DataType.FLOAT and node.outputs[0].dtype == ir.DataType.FLOAT
        if node.domain == "kiln":  # the attention plugin runs in the half type
            assert [v.dtype for v in node.inputs[:3]] == [low] * 3
        seen[node.op_type] += 1
    assert seen["MatMul"] and seen["RMSNormalization"] and seen[trt_plugin.PLUGIN_NAME] == LAYERS
    assert {v.dtype for v in (*model.graph.inputs, *model.graph.outputs)} <= {ir.DataType.FLOAT, ir.DataType.INT64}
