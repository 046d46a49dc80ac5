"""Whisper's encoder-decoder artifact: two graphs (the encoder once per window, returning every decoder layer's
cross-attention keys/values; the decoder for prefill and decode), each validated and described in kiln.json, run by
the runtime's WhisperSession to the tokens of transformers' generate."""

from __future__ import annotations

import json

import numpy as np
import pytest

import kiln
from kiln.errors import InputError
from kiln.runtime.engines import open_engine
from kiln.runtime.generate import GenerationConfig
from kiln.runtime.generate.whisper import WhisperDecoding, WhisperSession

transformers = pytest.importorskip("transformers")

from whisper_tiny import EOS, features, save_tiny_whisper, until_eos  # noqa: E402

TASK = "automatic-speech-recognition"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("whisper")
    hf = save_tiny_whisper(root / "ckpt")
    manifest = kiln.export(root / "ckpt", root / "out", task=TASK)
    return hf, root / "out", manifest


def test_two_graphs_validated_and_described(artifact):
    _, out, manifest = artifact
    assert manifest["model"] == "decoder.onnx" and manifest["encoder"]["model"] == "encoder.onnx"
    assert {"decoder.onnx", "encoder.onnx", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "kiln.json").read_text())["encoder"] == manifest["encoder"]
    # every attention one fused node: self- and cross-attention per decoder layer, one per encoder layer
    assert manifest["attention"]["nodes"] == manifest["op_counts"]["Attention"] == 4
    assert manifest["encoder"]["attention"]["nodes"] == manifest["encoder"]["op_counts"]["Attention"] == 2
    assert manifest["validation"]["passed"] and manifest["encoder"]["validation"]["passed"]
    # the decoder was checked with an empty and a non-empty cache; the encoder's cross keys/values output by output
    assert {shape[1] for shape in manifest["validation"]["shapes"]} >= {0, 5, 20}
    assert "cross_key_values.1.value" in manifest["encoder"]["validation"]["outputs"]
    inputs = {t["name"]: t["shape"] for t in manifest["inputs"]}
    assert inputs["cross_key_values.0.key"] == ["batch", 4, 1500, 8]
    assert manifest["encoder"]["inputs"] == [{"name": "input_features", "dtype": "float32",
                                              "shape": ["batch", 80, 3000]}]
    # the generation config's two alignment heads: their cross-attention, validated as every output
    outputs = {t["name"]: t["shape"] for t in manifest["outputs"]}
    assert outputs["alignment_weights"] == ["batch", 2, "sequence", 1500]
    assert "alignment_weights" in manifest["validation"]["outputs"]


def session(out) -> WhisperSession:
    rules = WhisperDecoding.from_dict(json.loads((out / "generation_config.json").read_text()))
    return WhisperSession(open_engine(out / "encoder.onnx"), open_engine(out / "decoder.onnx"), rules)


@pytest.mark.parametrize("options", [{}, {"language": "german", "task": "translate"}, {"return_timestamps": True}])
def test_the_artifact_decodes_transformers_tokens(artifact, options):
    hf, out, _ = artifact
    feats = features(3, seed=7)
    expected = [until_eos(row) for row in hf.generate(feats, max_new_tokens=10, force_unique_generate_call=True,
                                                      **options).tolist()]
    whisper = session(out)
    cross = whisper.encode(feats.numpy())
    rules, timestamps = whisper.rules, options.get("return_timestamps", False)
    languages = ([rules.language_id(options["language"])] * 3 if "language" in options
                 else whisper.detect_language(cross, 3))
    prompts = np.array([rules.prompt(int(lang), options.get("task"), timestamps) for lang in languages])
    config = GenerationConfig(max_new_tokens=10, eos_token_id=EOS, pad_token_id=EOS)
    tokens = np.stack(list(whisper.steps(cross, prompts, config, timestamps)), axis=1)
    got = [prompt + until_eos(row) for prompt, row in zip(prompts.tolist(), tokens.tolist())]
    assert got == expected


@pytest.mark.parametrize("beams", [2, 4])
@pytest.mark.parametrize("options", [{"language": "fr"}, {"language": "de", "return_timestamps": True}])
def test_beam_search_finds_transformers_sequences(artifact, beams, options):
    """WhisperSession.beam_search over the artifact against transformers' generate(num_beams=...): rows that end
    on end-of-text and rows cut at max_new_tokens, with and without the timestamp rules."""
    hf, out, _ = artifact
    whisper, timestamps = session(out), options.get("return_timestamps", False)
    config = GenerationConfig(max_new_tokens=12, eos_token_id=EOS, pad_token_id=EOS)
    for seed in range(4):
        feats = features(2, seed=seed)
        expected = hf.generate(feats, num_beams=beams, max_new_tokens=12, force_unique_generate_call=True,
                               **options).tolist()
        prompts = np.array([whisper.rules.prompt(whisper.rules.language_id(options["language"]), None,
                                                 timestamps)] * 2)
        got = whisper.beam_search(whisper.encode(feats.numpy(), handles=False), prompts, config, timestamps, beams)
        assert got == [until_eos(row[prompts.shape[1]:]) for row in expected], seed


def test_speech_exports_refuse_what_they_do_not_have_yet(tmp_path):
    save_tiny_whisper(tmp_path / "ckpt")
    with pytest.raises(InputError, match="exports at fp32, int8 or fp16 without --head-mask for now: int4"):
        kiln.export(tmp_path / "ckpt", tmp_path / "out", task=TASK, precision="int4")
    assert not (tmp_path / "out").exists()


def test_int8_quantizes_each_graph_as_its_kind_and_is_gated(tmp_path, monkeypatch):
    """The encoder's MatMuls dynamic int8 (MatMulInteger), the decoder's weight-only blockwise (MatMulNBits, the tied
    head too); the gate measures the pair end to end and refuses it below either threshold."""
    from kiln.errors import ValidationError
    from kiln.exporter import precision

    save_tiny_whisper(tmp_path / "ckpt", preprocessing=True)
    manifest = kiln.export(tmp_path / "ckpt", tmp_path / "out", task=TASK, precision="int8")
    decoder_ops, encoder_ops = manifest["op_counts"], manifest["encoder"]["op_counts"]
    # per decoder layer: self-attention q, k, v, o, cross-attention q, o, two MLP layers; and the LM head
    assert decoder_ops["MatMulNBits"] == 2 * 8 + 1 and "MatMul" not in decoder_ops
    # per encoder layer q, k, v, o and the MLP's two; the cross-attention keys and values of both decoder layers
    assert encoder_ops["MatMulInteger"] == 2 * 6 + 2 * 2 and "MatMulNBits" not in encoder_ops
    accuracy = manifest["accuracy"]
    assert accuracy["passed"] and set(accuracy["gates"]) == {"next_token_agreement", "encoder_mean_cosine"}
    assert accuracy["encoder_mean_cosine"] > 0.99 and accuracy["inputs"] == len(precision.SENTENCES)
    result = kiln.pipeline(TASK, tmp_path / "out")(features(1, seed=1).numpy()[0, 0] * 0.01, max_new_tokens=5)
    assert isinstance(result["text"], str)
    monkeypatch.setitem(precision.GATES, "mean_cosine", 1.5)
    with pytest.raises(ValidationError, match="int8 is below its accuracy gate: encoder_mean_cosine 0.9.* < 1.5"):
        kiln.export(tmp_path / "ckpt", tmp_path / "refused", task=TASK, precision="int8")
    assert not (tmp_path / "refused").exists()


def test_fp16_halves_both_graphs(tmp_path):
    import onnx

    save_tiny_whisper(tmp_path / "ckpt", preprocessing=True)
    manifest = kiln.export(tmp_path / "ckpt", tmp_path / "out", task=TASK, precision="fp16")
    assert manifest["precision"] == "fp16" and manifest["accuracy"]["passed"]
    for name in ("decoder.onnx", "encoder.onnx"):
        graph = onnx.load(str(tmp_path / "out" / name)).graph
        weights = {i.data_type for i in graph.initializer if len(i.dims) == 2 and i.data_type != onnx.TensorProto.INT64}
        assert weights == {onnx.TensorProto.FLOAT16}, name  # (int64: indices, such as the alignment heads')
        assert {i.type.tensor_type.elem_type for i in graph.input} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    result = kiln.pipeline(TASK, tmp_path / "out")(features(1, seed=1).numpy()[0, 0] * 0.01, max_new_tokens=5)
    assert isinstance(result["text"], str)


def test_tools_for_one_graph_say_so(artifact):
    _, out, _ = artifact
    with pytest.raises(InputError, match="kiln bench times one-graph artifacts.*bench_whisper.py"):
        kiln.bench(out)
    with pytest.raises(InputError, match="kiln build makes TensorRT engines for one-graph artifacts only"):
        kiln.build(out)
