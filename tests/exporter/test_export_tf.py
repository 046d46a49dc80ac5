"""Export through the TensorFlow sibling and tf2onnx (``framework="tf"``): the manifest says so, the graph has the
spec's names and axes, it computes what the torch-exported artifact computes on the same feeds, and the runtime
pipelines run it unchanged. Also the converter's failure modes and its large-model handling."""

from __future__ import annotations

import importlib.util
import logging
from collections import Counter

import numpy as np
import onnx
import pytest

if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("export with --framework tf needs tensorflow and tf2onnx: pip install 'kiln[tf]'",
                allow_module_level=True)

# Before anything else imports TensorFlow: kiln's TensorFlow modules load triton first (kiln/graphs/bert/model_tf.py).
from kiln.exporter.trace import tf as trace_tf  # noqa: E402, I001

import tensorflow as tf  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import kiln  # noqa: E402
from kiln.artifact import load_manifest  # noqa: E402
from kiln.errors import ExportError  # noqa: E402
from kiln.exporter.specs import AxisRange, ExportSpec, TensorSpec, decoder_feed, text_feed  # noqa: E402
from kiln.graphs.checkpoint import from_pretrained  # noqa: E402
from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402

ATOL = 1e-4
ENCODERS = [("bert", "feature-extraction"), ("bert", "token-classification"), ("roberta", "text-classification")]
SENTENCES = ["hello world", "the river runs through paris and london", "a"]


@pytest.fixture(scope="module")
def tf_artifacts(checkpoints, tmp_path_factory):
    """TensorFlow exports of the shared tiny checkpoints, with the torch artifacts' axis ranges; keyed like them."""
    cache = {}

    def get(model_type, task):
        if (model_type, task) not in cache:
            out = tmp_path_factory.mktemp("tf-artifacts") / f"{model_type}-{task}"
            kiln.export(str(checkpoints(model_type, task)[0]), out, task=task, batch="1:8", seq="1:64", framework="tf")
            cache[(model_type, task)] = out
        return cache[(model_type, task)]

    return get


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny grouped-query Llama with a tokenizer, exported by torch and by TensorFlow: (checkpoint, torch, tf)."""
    from conftest import roberta_tokenizer

    tokenizer = roberta_tokenizer()
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3,
        bos_token_id=0, pad_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("llama")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "checkpoint")
    tokenizer.save_pretrained(root / "checkpoint")
    for framework in ("torch", "tf"):
        kiln.export(str(root / "checkpoint"), root / framework, task="text-generation", batch="1:4",
                    framework=framework)
    return root / "checkpoint", root / "torch", root / "tf"


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def check_manifest_and_graph(tf_artifact, torch_artifact) -> None:
    manifest, reference = load_manifest(tf_artifact), load_manifest(torch_artifact)
    assert manifest["framework"] == "tf" and manifest["validation"]["passed"]
    # tf2onnx has no fused attention op: one Softmax per layer instead, recorded as decomposed.
    assert manifest["attention"]["lowering"] == "decomposed" and manifest["attention"]["nodes"] == 0
    model = onnx.load(str(tf_artifact / "model.onnx"))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert manifest["opset"] == opset == trace_tf.max_opset() == 18
    ops = Counter(n.op_type for n in model.graph.node)
    typed = {v.name for v in (*model.graph.value_info, *model.graph.output)}
    assert all(o in typed for n in model.graph.node for o in n.output if o)  # the fp16/bf16 pass needs every type
    ops_torch = reference["op_counts"]  # a decoder writing its cache in place has a GroupQueryAttention a layer instead
    layers = ops_torch.get("Attention") or ops_torch["GroupQueryAttention"]
    assert ops["Softmax"] == layers and ops["Attention"] == 0
    # The same interface as the torch artifact: names, order, dtypes and named axes.
    assert manifest["inputs"] == reference["inputs"] and manifest["outputs"] == reference["outputs"]
    assert manifest.get("optional_inputs") == reference.get("optional_inputs")
    fed = [v for v in model.graph.input if v.name not in {i.name for i in model.graph.initializer}]
    # kiln.json gives the shapes of a run with the defaults; a decoder graph declares that its logits may be fewer
    # positions than it is fed (logits_to_keep).
    declared = [dict(s, shape=["batch", "logits_sequence", s["shape"][-1]])
                if s["name"] == "logits" and manifest.get("optional_inputs") else s for s in manifest["outputs"]]
    for values, specs in ((fed, manifest["inputs"]), (model.graph.output, declared)):
        assert [v.name for v in values] == [s["name"] for s in specs]
        assert [dims(v) for v in values] == [s["shape"] for s in specs]
        assert [onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name for v in values] == [
            s["dtype"] for s in specs]


def run_both(tf_artifact, torch_artifact, feed) -> tuple[dict, dict]:
    engines = [OnnxRuntimeEngine(a / "model.onnx") for a in (tf_artifact, torch_artifact)]
    got, want = (engine.run(feed) for engine in engines)
    for engine in engines:
        engine.close()
    assert list(got) == list(want)
    return got, want


@pytest.mark.parametrize("model_type,task", ENCODERS)
def test_encoder_artifact_matches_the_torch_artifact(model_type, task, checkpoints, artifacts, tf_artifacts):
    tf_artifact, torch_artifact = tf_artifacts(model_type, task), artifacts(model_type, task)
    check_manifest_and_graph(tf_artifact, torch_artifact)
    config = from_pretrained(checkpoints(model_type, task)[0], task).config
    names = [t["name"] for t in load_manifest(tf_artifact)["inputs"]]
    make = text_feed(config.vocab_size, config.pad_token_id, names)
    rng = np.random.default_rng(0)
    for sizes in ({"batch": 1, "sequence": 1}, {"batch": 3, "sequence": 17}, {"batch": 8, "sequence": 64}):
        got, want = run_both(tf_artifact, torch_artifact, make(sizes, rng))
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=ATOL, rtol=0, err_msg=f"{task} {name} {sizes}")


def test_feature_extraction_pipeline_runs_the_tf_artifact(artifacts, tf_artifacts):
    ours = kiln.pipeline("feature-extraction", tf_artifacts("bert", "feature-extraction"))
    theirs = kiln.pipeline("feature-extraction", artifacts("bert", "feature-extraction"))
    for kwargs in ({}, {"pooling": "mean", "normalize": True}):
        got, want = ours(SENTENCES, **kwargs), theirs(SENTENCES, **kwargs)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(np.array(a), np.array(b), atol=ATOL, rtol=0)


def test_text_classification_pipeline_runs_the_tf_artifact(artifacts, tf_artifacts):
    got = kiln.pipeline("text-classification", tf_artifacts("roberta", "text-classification"))(SENTENCES, top_k=None)
    want = kiln.pipeline("text-classification", artifacts("roberta", "text-classification"))(SENTENCES, top_k=None)
    for row_got, row_want in zip(got, want, strict=True):
        assert [r["label"] for r in row_got] == [r["label"] for r in row_want]
        np.testing.assert_allclose([r["score"] for r in row_got], [r["score"] for r in row_want], atol=ATOL)


def test_hidden_states_and_attentions_outputs(checkpoints, tmp_path):
    path, _ = checkpoints("bert", "feature-extraction")
    manifest = kiln.export(str(path), tmp_path, task="feature-extraction", batch="1:4", seq="1:32", framework="tf",
                           output_hidden_states=True, output_attentions=True)
    names = [o["name"] for o in manifest["outputs"]]
    assert names == ["last_hidden_state", "pooler_output", "hidden_states.0", "hidden_states.1", "hidden_states.2",
                     "attentions.0", "attentions.1"]
    assert manifest["outputs"][-1]["shape"] == ["batch", 4, "sequence", "sequence"]
    reference = from_pretrained(path, "feature-extraction")  # torch
    feed = text_feed(reference.config.vocab_size, 0, ["input_ids", "attention_mask", "token_type_ids"])(
        {"batch": 3, "sequence": 9}, np.random.default_rng(1))
    got = OnnxRuntimeEngine(tmp_path / "model.onnx").run(feed)
    with torch.no_grad():
        out = reference(**{k: torch.from_numpy(v) for k, v in feed.items()}, output_hidden_states=True,
                        output_attentions=True)
    for name in names:
        key, _, index = name.partition(".")
        want = (out[key][int(index)] if index else out[key]).numpy()
        np.testing.assert_allclose(got[name], want, atol=ATOL, rtol=0, err_msg=name)


def test_decoder_artifact_matches_the_torch_artifact_and_takes_an_empty_cache(llama):
    checkpoint, torch_artifact, tf_artifact = llama
    check_manifest_and_graph(tf_artifact, torch_artifact)
    config = from_pretrained(checkpoint, "text-generation").config
    names = [t["name"] for t in load_manifest(tf_artifact)["inputs"]]
    make, rng = decoder_feed(config, names), np.random.default_rng(0)
    for sizes in ({"batch": 1, "sequence": 5, "past_sequence": 0}, {"batch": 3, "sequence": 1, "past_sequence": 9},
                  {"batch": 2, "sequence": 6, "past_sequence": 4}):
        feed = make(sizes, rng)
        got, want = run_both(tf_artifact, torch_artifact, feed)
        rows = feed["attention_mask"][:, -sizes["sequence"]:].astype(bool)  # left-padding queries are undefined
        np.testing.assert_allclose(got["logits"][rows], want["logits"][rows], atol=ATOL, rtol=0, err_msg=str(sizes))
        for name in names[3:]:
            present = name.replace("past_key_values", "present")
            np.testing.assert_allclose(got[present], want[present], atol=ATOL, rtol=0, err_msg=f"{present} {sizes}")
    # An empty cache (past_sequence 0) prefill, then one decode step over its presents, equals the full run.
    engine = OnnxRuntimeEngine(tf_artifact / "model.onnx")
    feed = make({"batch": 2, "sequence": 7, "past_sequence": 0}, rng)
    full = engine.run(feed)
    prefix = engine.run({**{k: v[:, :-1] if k in ("input_ids", "position_ids", "attention_mask") else v
                            for k, v in feed.items()}})
    past = {n: prefix[n.replace("past_key_values", "present")] for n in names[3:]}
    step = engine.run({"input_ids": feed["input_ids"][:, -1:], "attention_mask": feed["attention_mask"],
                       "position_ids": feed["position_ids"][:, -1:], **past})
    np.testing.assert_allclose(step["logits"][:, 0], full["logits"][:, -1], atol=ATOL, rtol=0)


def test_text_generation_pipeline_greedy_tokens_equal_the_torch_artifact(llama):
    from kiln.runtime.generate import generate

    _, torch_artifact, tf_artifact = llama
    pipes = [kiln.pipeline("text-generation", a) for a in (tf_artifact, torch_artifact)]
    assert pipes[0](SENTENCES, max_new_tokens=10) == pipes[1](SENTENCES, max_new_tokens=10)
    batch = pipes[0].tokenizer(SENTENCES, padding_side="left")
    tokens = [generate(p.decoder, batch.input_ids, batch.attention_mask, p.defaults.merge(max_new_tokens=10))
              for p in pipes]
    np.testing.assert_array_equal(tokens[0], tokens[1])
    assert len(np.unique(tokens[0])) > 1  # not one token repeated: the comparison means something


class _Erfc:
    """A stand-in reference whose graph needs TensorFlow's Erfc, which tf2onnx cannot convert."""

    def named_parameters(self):
        return []

    def __call__(self, input_ids):
        return {"last_hidden_state": tf.math.erfc(tf.cast(input_ids, tf.float32))[..., None]}


def tiny_spec() -> ExportSpec:
    return ExportSpec("feature-extraction", (TensorSpec("input_ids", "int64", ("batch", "sequence")),),
                      (TensorSpec("last_hidden_state", "float32", ("batch", "sequence", 1)),),
                      {"batch": AxisRange(1, 4), "sequence": AxisRange(1, 8)}, make_feed=None)


def test_ops_tf2onnx_leaves_unconverted_are_an_export_error(tmp_path):
    with pytest.raises(ExportError, match="could not convert the TensorFlow ops Erfc at opset 18"):
        trace_tf.trace(_Erfc(), tiny_spec(), tmp_path / "model.onnx")


def test_converter_failures_are_one_line_export_errors(tmp_path, monkeypatch):
    import tf2onnx

    def broken(*args, **kwargs):
        raise ValueError("Cannot convert op Foo\n  many lines of TensorFlow internals")

    monkeypatch.setattr(tf2onnx.convert, "from_function", broken)
    with pytest.raises(ExportError, match=r"tf2onnx could not convert the model: Cannot convert op Foo\. Run with"):
        trace_tf.trace(_Erfc(), tiny_spec(), tmp_path / "model.onnx")


def test_big_weights_go_to_external_data_and_too_big_ones_are_refused(checkpoints, tmp_path, monkeypatch, caplog):
    from kiln.exporter.specs import spec_for

    path, _ = checkpoints("bert", "feature-extraction")
    reference = from_pretrained(path, "feature-extraction", framework="tf")
    spec = spec_for("text-encoder", reference, "feature-extraction", batch=AxisRange(1, 4), seq=AxisRange(1, 16))
    monkeypatch.setattr(trace_tf, "EXTERNAL_DATA_BYTES", 0)
    with caplog.at_level(logging.INFO, logger="kiln"):
        trace_tf.trace(reference, spec, tmp_path / "model.onnx", opset=23)
    assert "converting at 18 instead of 23" in caplog.text
    assert (tmp_path / "model.onnx.data").stat().st_size > (tmp_path / "model.onnx").stat().st_size
    feed = spec.make_feed({"batch": 2, "sequence": 5}, np.random.default_rng(0))
    got = OnnxRuntimeEngine(tmp_path / "model.onnx").run(feed)
    want = trace_tf.reference_runner(reference, [t.name for t in spec.outputs])(feed)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=ATOL, rtol=0)

    monkeypatch.setattr(trace_tf, "MAX_WEIGHT_BYTES", 1000)
    with pytest.raises(ExportError, match="exceed the 2 GB that tf2onnx can convert"):
        trace_tf.trace(reference, spec, tmp_path / "refused.onnx")
