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


def test_speech_exports_refuse_what_they_do_not_have_yet(tmp_path):
    save_tiny_whisper(tmp_path / "ckpt")
    with pytest.raises(InputError, match="exports in fp32 without --head-mask for now"):
        kiln.export(tmp_path / "ckpt", tmp_path / "out", task=TASK, precision="int8")
    assert not (tmp_path / "out").exists()


def test_tools_for_one_graph_say_so(artifact):
    _, out, _ = artifact
    with pytest.raises(InputError, match="kiln bench times one-graph artifacts.*bench_whisper.py"):
        kiln.bench(out)
    with pytest.raises(InputError, match="kiln build makes TensorRT engines for one-graph artifacts only"):
        kiln.build(out)
