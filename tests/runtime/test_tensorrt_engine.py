"""Which engine runs an artifact (pure selection, tested with fakes), the fallback to onnxruntime with its log line,
the device-resident KV cache path of the decode loop (a fake engine), and, where TensorRT and a GPU exist, the real
TensorRT engine against onnxruntime."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

import kiln
from kiln.errors import InputError
from kiln.runtime.engines import TensorInfo, open_engine
from kiln.runtime.engines.select import select_engine
from kiln.runtime.engines.tensorrt import TENSORRT_MISSING, gpu_compute_capability, tensorrt_version
from kiln.runtime.generate import DecoderSession, GenerationConfig, generate

FACTS = dict(tensorrt_version="10.14.1.48", compute_capability="9.0", onnx_sha256="sha")


def entry(key="k1", **changes) -> dict:
    return {"key": key, "file": f"engines/{key}.plan", "precision": "fp16", "tensorrt": "10.14.1.48",
            "compute_capability": "9.0", "onnx_sha256": "sha", "version_compatible": False, **changes}


def test_a_matching_engine_is_chosen():
    assert select_engine([entry()], **FACTS) == (entry(), "")


@pytest.mark.parametrize("engines, facts, reason", [
    ([], {}, "has no TensorRT engine (build one with `kiln build DIR`)"),
    ([entry()], {"tensorrt_version": None}, TENSORRT_MISSING),
    ([entry()], {"compute_capability": None}, "no NVIDIA GPU is visible"),
    ([entry()], {"compute_capability": "8.9"},
     "k1: built with TensorRT 10.14.1.48 on compute capability 9.0, this GPU is 8.9"),
    ([entry()], {"tensorrt_version": "10.15.0.1"}, "TensorRT here is 10.15.0.1"),
    ([entry()], {"onnx_sha256": "other"}, "built from another model.onnx"),
])
def test_no_engine_fits_and_the_reason_says_why(engines, facts, reason):
    chosen, why = select_engine(engines, **{**FACTS, **facts})
    assert chosen is None and reason in why


def test_a_missing_plan_file_does_not_fit():
    chosen, why = select_engine([entry()], **FACTS, exists=lambda file: False)
    assert chosen is None and "engines/k1.plan is missing" in why


@pytest.mark.parametrize("installed, fits", [("10.14.1.48", True), ("10.16.0.1", True), ("10.13.0.0", False),
                                              ("11.0.0.1", False)])
def test_version_compatible_engines_run_on_later_releases_of_their_major(installed, fits):
    chosen, _ = select_engine([entry(version_compatible=True)], **{**FACTS, "tensorrt_version": installed})
    assert (chosen is not None) is fits


def test_the_last_built_wins_and_precision_narrows():
    engines = [entry("a", precision="fp32"), entry("b", precision="fp16"), entry("c", compute_capability="8.0")]
    assert select_engine(engines, **FACTS)[0]["key"] == "b"
    assert select_engine(engines, **FACTS, precision="fp32")[0]["key"] == "a"


@pytest.fixture
def artifact_with_engine(artifacts, tmp_path):
    """A copy of the tiny BERT artifact whose kiln.json lists an engine (a plan this machine cannot run)."""
    path = tmp_path / "art"
    shutil.copytree(artifacts("bert", "feature-extraction"), path)
    manifest = json.loads((path / "kiln.json").read_text())
    manifest["engines"] = [entry(onnx_sha256=manifest["files"]["model.onnx"])]
    (path / "kiln.json").write_text(json.dumps(manifest))
    (path / "engines").mkdir()
    (path / "engines" / "k1.plan").write_bytes(b"not a plan")
    return path


@pytest.mark.skipif(tensorrt_version() is not None, reason="TensorRT is installed here")
def test_auto_falls_back_to_onnxruntime_and_logs_why(artifact_with_engine, caplog):
    with caplog.at_level(logging.INFO, logger="kiln"):
        engine = open_engine(artifact_with_engine / "model.onnx", device="auto")
    assert engine.name == "onnxruntime"
    assert "device='auto': running on onnxruntime, not TensorRT: " + TENSORRT_MISSING in caplog.text
    with pytest.raises(InputError, match="device='tensorrt': cannot run .* TensorRT is not installed"):
        open_engine(artifact_with_engine, device="tensorrt")


def test_cpu_never_looks_for_engines(artifact_with_engine, monkeypatch, caplog):
    import kiln.runtime.engines.tensorrt as trt_engine

    monkeypatch.setattr(trt_engine, "tensorrt_version", lambda: pytest.fail("device='cpu' must not probe TensorRT"))
    with caplog.at_level(logging.INFO, logger="kiln"):
        engine = open_engine(artifact_with_engine / "model.onnx", device="cpu")
    assert engine.name == "onnxruntime" and engine.providers == ["CPUExecutionProvider"]
    assert "TensorRT" not in caplog.text


def test_pipeline_auto_runs_and_matches_cpu(artifact_with_engine):
    auto = kiln.pipeline("feature-extraction", artifact_with_engine, device="auto")
    cpu = kiln.pipeline("feature-extraction", artifact_with_engine, device="cpu")
    np.testing.assert_allclose(auto("hello world", pooling="mean"), cpu("hello world", pooling="mean"), atol=1e-6)


def test_unknown_device_is_refused(artifact_with_engine):
    with pytest.raises(InputError, match="Unknown device 'tpu'; use one of cpu, cuda, auto, tensorrt"):
        open_engine(artifact_with_engine, device="tpu")


class DeviceCacheEngine:
    """A decoder engine that keeps outputs on its side: the ones ``keep`` names come back as opaque handles that must
    be fed back as they are (TensorRT's device buffers, onnxruntime's OrtValues)."""

    name = "fake-device"

    def __init__(self):
        self.calls, self.released = [], 0

    def inputs(self):
        return [TensorInfo(n, "int64", ("batch", "s")) for n in ("input_ids", "attention_mask", "position_ids")] + [
            TensorInfo(f"past_key_values.0.{k}", "float32", ("batch", 1, "past_sequence", 4)) for k in ("key", "value")]

    def optional_inputs(self):
        return []

    def outputs(self):
        return []

    def run(self, feed, outputs=None, keep=()):
        step = len(self.calls)
        self.calls.append((feed, tuple(keep)))
        B, T = feed["input_ids"].shape
        logits = np.zeros((B, T, 5), np.float32)
        logits[:, -1, (step + 3) % 5] = 1.0  # greedy picks 3, 4, 0, ...
        return {"logits": logits, **{name: ("device", name, step) for name in keep}}

    def release(self):
        self.released += 1


def test_decode_loop_keeps_the_cache_on_the_device():
    engine = DeviceCacheEngine()
    session = DecoderSession(engine)
    tokens = generate(session, np.array([[1, 2]]), np.ones((1, 2), np.int64), GenerationConfig(max_new_tokens=3))
    assert tokens.tolist() == [[3, 4, 0]]
    assert [keep for _, keep in engine.calls] == [("present.0.key", "present.0.value")] * 3
    assert isinstance(engine.calls[0][0]["past_key_values.0.key"], np.ndarray)  # the empty first cache
    assert engine.calls[1][0]["past_key_values.0.value"] == ("device", "present.0.value", 0)  # fed back as is
    assert engine.calls[2][0]["past_key_values.0.key"] == ("device", "present.0.key", 1)
    assert "logits_to_keep" not in engine.calls[0][0]  # the engine takes no optional input
    assert engine.released == 1  # the generation's engine state is dropped once it ends


def test_the_decode_loop_is_a_generator_that_releases_when_closed():
    from kiln.runtime.generate import steps

    engine = DeviceCacheEngine()
    loop = steps(DecoderSession(engine), np.array([[1, 2], [0, 5]]), np.array([[1, 1], [0, 1]]),
                 GenerationConfig(max_new_tokens=10))
    assert engine.calls == []  # lazy: nothing runs before the first token is asked for
    assert next(loop).tolist() == [3, 3] and len(engine.calls) == 1
    np.testing.assert_array_equal(engine.calls[0][0]["position_ids"], [[0, 1], [0, 0]])  # left padding
    assert next(loop).tolist() == [4, 4] and len(engine.calls) == 2
    np.testing.assert_array_equal(engine.calls[1][0]["position_ids"], [[2], [1]])
    loop.close()
    assert len(engine.calls) == 2 and engine.released == 1


NO_TENSORRT_GPU = TENSORRT_MISSING if tensorrt_version() is None else (
    "needs an NVIDIA GPU (CUDA found none)" if gpu_compute_capability() is None else None)


@pytest.mark.skipif(NO_TENSORRT_GPU is not None, reason=NO_TENSORRT_GPU or "")
@pytest.mark.gpu
def test_tensorrt_decoder_generates_onnxruntimes_tokens(tmp_path):
    """A tiny Llama (head dim 16) built with the kiln plugin: greedy tokens from TensorRT equal onnxruntime's."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(
        "llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=37, vocab_size=100, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(tmp_path / "checkpoint")
    kiln.export(str(tmp_path / "checkpoint"), tmp_path / "artifact", task="text-generation", batch="1:4")
    entry_ = kiln.build(tmp_path / "artifact", profile="batch=1:2:4,seq=1:1:32,past=0:16:31")
    assert entry_["plugin"] in ("aot", "jit") and entry_["attention"]["plugin"] == 2
    ids = np.array([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    greedy = GenerationConfig(max_new_tokens=8, eos_token_id=None)
    engines = {d: open_engine(tmp_path / "artifact", device=d) for d in ("cpu", "tensorrt")}
    assert engines["tensorrt"].name == "tensorrt"
    tokens = {d: generate(DecoderSession(e), ids, mask, greedy) for d, e in engines.items()}
    np.testing.assert_array_equal(tokens["tensorrt"], tokens["cpu"])
