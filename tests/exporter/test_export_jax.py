"""Export through the JAX references and jax2onnx: one standard ONNX Attention node per layer, the same graph
interface as the torch artifact (names, int64 inputs, named axes), the same outputs on the same feeds, and the
runtime pipelines run the JAX artifact unchanged."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest

pytest.importorskip("flax", reason="pip install 'kiln[jax]' for the JAX references")
pytest.importorskip("jax2onnx", reason="pip install 'kiln[jax]' for JAX export")
import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import assert_same, roberta_tokenizer  # noqa: E402

import kiln  # noqa: E402
from kiln.artifact import load_manifest  # noqa: E402
from kiln.errors import ExportError  # noqa: E402
from kiln.exporter.specs import AxisRange, ExportSpec, TensorSpec, text_feed  # noqa: E402
from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402

BERT_EXPORTS = [("bert", "feature-extraction"), ("bert", "question-answering"), ("roberta", "token-classification")]
SENTENCES = ["the river runs through paris", "hello world", "kiln runs fast and the city is great"]


@pytest.fixture(scope="module")
def jax_artifacts(checkpoints, tmp_path_factory):
    """JAX exports of the tiny checkpoints, with the same ranges as conftest's torch ``artifacts``."""
    cache = {}

    def get(model_type: str, task: str):
        if (model_type, task) not in cache:
            path, _ = checkpoints(model_type, task)
            out = tmp_path_factory.mktemp("jax") / f"{model_type}-{task}"
            kiln.export(str(path), out, task=task, batch="1:8", seq="1:64", framework="jax")
            cache[(model_type, task)] = out
        return cache[(model_type, task)]

    return get


def interface(artifact) -> list:
    """Each graph input and output: (name, element type, dims with their names)."""
    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in (*graph.input, *graph.output)]


def run_both(jax_artifact, torch_artifact, feeds) -> None:
    """The two artifacts give the same outputs (within 1e-4) on every feed, at the positions a caller reads (a
    decoder's padded positions are arbitrary: kiln.exporter.validate.meaningful_positions)."""
    from kiln.exporter.validate import meaningful_positions

    ours, theirs = OnnxRuntimeEngine(jax_artifact / "model.onnx"), OnnxRuntimeEngine(torch_artifact / "model.onnx")
    for feed in feeds:
        got, want = ours.run(feed), theirs.run(feed)
        assert list(got) == list(want)
        for name in want:
            np.testing.assert_allclose(meaningful_positions(got[name], feed), meaningful_positions(want[name], feed),
                                       atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize("model_type, task", BERT_EXPORTS)
def test_bert_export_matches_the_torch_artifact(model_type, task, jax_artifacts, artifacts):
    ours, theirs = jax_artifacts(model_type, task), artifacts(model_type, task)
    manifest = load_manifest(ours)
    assert manifest["framework"] == "jax" and "jax2onnx" in manifest["export"]
    assert (manifest["attention"]["lowering"], manifest["attention"]["nodes"]) == ("onnx-attention", 2)
    assert manifest["validation"]["passed"]
    graph = onnx.load(str(ours / "model.onnx")).graph
    assert Counter(n.op_type for n in graph.node)["Attention"] == 2
    assert interface(ours) == interface(theirs)  # names, int64 ids and masks, float32 outputs, named axes
    assert manifest["inputs"] == load_manifest(theirs)["inputs"]
    names = [t["name"] for t in manifest["inputs"]]
    config = json.loads((ours / "config.json").read_text())
    make = text_feed(config["vocab_size"], config["pad_token_id"], names)
    rng = np.random.default_rng(0)
    run_both(ours, theirs, [make({"batch": b, "sequence": t}, rng) for b, t in ((1, 7), (3, 33), (2, 1), (4, 64))])


def test_pipelines_run_the_jax_artifact(jax_artifacts, artifacts):
    embed = [np.array(kiln.pipeline("feature-extraction", a("bert", "feature-extraction"))(SENTENCES, pooling="mean"))
             for a in (jax_artifacts, artifacts)]
    np.testing.assert_allclose(embed[0], embed[1], atol=1e-4)
    question, context = "what runs through paris", SENTENCES[0] + " and " + SENTENCES[2]
    qa = [kiln.pipeline("question-answering", a("bert", "question-answering"))(question=question, context=context)
          for a in (jax_artifacts, artifacts)]
    assert_same(qa[0], qa[1], atol=1e-4)
    ner = [kiln.pipeline("token-classification", a("roberta", "token-classification"))(SENTENCES) for a in
           (jax_artifacts, artifacts)]
    assert len(ner[0]) == 3 and any(ner[0])
    assert_same(ner[0], ner[1], atol=1e-4)


def test_output_attentions_trace_decomposed(checkpoints, tmp_path):
    """Probabilities need the eager math, which jax2onnx keeps as MatMul/Softmax; the exporter records that."""
    from kiln.exporter.export import attention_lowering
    from kiln.exporter.specs import spec_for
    from kiln.exporter.trace.jax import trace
    from kiln.graphs.checkpoint import from_pretrained

    path = checkpoints("bert", "feature-extraction")[0]
    model = from_pretrained(path, framework="jax")
    spec = spec_for("text-encoder", model, "feature-extraction", hidden_states=True, attentions=True)
    onnx_path = trace(model, spec, tmp_path / "model.onnx")
    graph = onnx.load(str(onnx_path)).graph
    ops = Counter(n.op_type for n in graph.node)
    assert (ops["Attention"], ops["Softmax"]) == (0, 2)
    assert attention_lowering(ops, 2, "jax") == "decomposed"
    assert [o.name for o in graph.output] == [t.name for t in spec.outputs]
    # The decomposed graph's probabilities and hidden states are the torch reference's.
    feed = spec.make_feed({"batch": 3, "sequence": 9}, np.random.default_rng(0))
    got = OnnxRuntimeEngine(onnx_path).run(feed)
    with torch.no_grad():
        want = from_pretrained(path)(**{k: torch.from_numpy(v) for k, v in feed.items()}, output_hidden_states=True,
                                     output_attentions=True)
    for name in ("attentions.0", "attentions.1", "hidden_states.2"):
        kind, i = name.split(".")
        np.testing.assert_allclose(got[name], want[kind][int(i)].numpy(), atol=1e-5, err_msg=name)


def test_trace_errors_are_one_line_export_errors(tmp_path):
    from kiln.exporter.trace.jax import trace

    spec = ExportSpec("feature-extraction", (TensorSpec("input_ids", "int64", ("batch", "sequence")),),
                      (TensorSpec("last_hidden_state", "float32", ("batch", "sequence", 4)),),
                      {"batch": AxisRange(1, 4), "sequence": AxisRange(1, 8)}, make_feed=None)

    def broken(**inputs):
        raise NotImplementedError("no ONNX lowering for primitive 'fancy_op'\n  with a long traceback")

    with pytest.raises(ExportError, match="too old"):
        trace(broken, spec, tmp_path / "model.onnx", opset=21)
    with pytest.raises(ExportError, match="jax2onnx could not convert the model: NotImplementedError: no ONNX") as err:
        trace(broken, spec, tmp_path / "model.onnx")
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """A tiny Llama (grouped-query, untied) with a tokenizer, exported by both frameworks."""
    tokenizer = roberta_tokenizer()
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    root = tmp_path_factory.mktemp("llama")
    model.save_pretrained(root / "checkpoint")
    tokenizer.save_pretrained(root / "checkpoint")
    for framework in ("torch", "jax"):
        kiln.export(str(root / "checkpoint"), root / framework, task="text-generation", batch="1:4",
                    framework=framework)
    return root / "jax", root / "torch"


def test_decoder_export_matches_the_torch_artifact(decoders):
    from kiln.exporter.specs import decoder_feed
    from kiln.graphs.llama.config import LlamaConfig

    ours, theirs = decoders
    manifest = load_manifest(ours)
    assert manifest["framework"] == "jax" and manifest["validation"]["passed"]
    assert (manifest["attention"]["lowering"], manifest["attention"]["nodes"]) == ("onnx-attention", 2)
    # The torch artifact writes its cache in place (past axis cache_capacity; jax2onnx's graph is 4-D, which the pass
    # leaves concatenated): the same interface otherwise, and kiln's engine feeds both the same way.
    assert load_manifest(theirs)["attention"]["cache"] == "in-place" and manifest["attention"]["cache"] == "concat"
    in_place = [(n, t, ["past_sequence" if d == "cache_capacity" and n.startswith("past") else
                        "total_sequence" if d == "cache_capacity" else d for d in dims])
                for n, t, dims in interface(theirs)]
    assert interface(ours) == in_place
    config = LlamaConfig.from_dict(json.loads((ours / "config.json").read_text()))
    make = decoder_feed(config, [t["name"] for t in manifest["inputs"]])
    rng = np.random.default_rng(0)
    sizes = [(1, 7, 0), (3, 5, 0), (2, 1, 9), (3, 4, 6)]  # (batch, sequence, past_sequence): prefill and decode
    run_both(ours, theirs, [make({"batch": b, "sequence": t, "past_sequence": p}, rng) for b, t, p in sizes])


def test_text_generation_greedy_tokens_equal(decoders):
    from kiln.runtime.generate import generate

    ours, theirs = (kiln.pipeline("text-generation", artifact) for artifact in decoders)
    batch = ours.tokenizer(SENTENCES, padding_side="left")
    config = ours.defaults.merge(max_new_tokens=12)
    tokens = generate(ours.decoder, batch.input_ids, batch.attention_mask, config)
    assert tokens.shape == (3, 12)
    np.testing.assert_array_equal(tokens, generate(theirs.decoder, batch.input_ids, batch.attention_mask, config))
    assert ours(SENTENCES[0], max_new_tokens=10) == theirs(SENTENCES[0], max_new_tokens=10)
