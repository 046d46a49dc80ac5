"""Engine building: the pure decisions (profiles from named axes, cache keys, precision plan, engine paths) tested
here; ``kiln build`` without TensorRT fails with what to install; a real build runs only where TensorRT imports."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from kiln.artifact import load_manifest, verify
from kiln.cli.__main__ import main
from kiln.errors import InputError, MissingDependencyError
from kiln.exporter import tensorrt as trt_build
from kiln.runtime.engines.tensorrt import TENSORRT_MISSING, gpu_compute_capability, tensorrt_version

ENCODER = {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
                      {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]}],
           "dynamic_axes": {"batch": {"min": 1, "max": 64}, "sequence": {"min": 1, "max": 512}}}
DECODER = {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
                      {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_sequence"]},
                      {"name": "past_key_values.0.key", "dtype": "float32",
                       "shape": ["batch", 2, "past_sequence", 64]}],
           "dynamic_axes": {"batch": {"min": 1, "max": 8}, "sequence": {"min": 1, "max": 2048},
                            "past_sequence": {"min": 0, "max": 2047}}}


def test_profile_from_request_and_named_axes():
    shapes = trt_build.profiles(ENCODER, "batch=1:8:32,seq=1:128:512")
    assert shapes == {"input_ids": ((1, 1), (8, 128), (32, 512)), "attention_mask": ((1, 1), (8, 128), (32, 512))}


def test_unrequested_axes_span_the_exported_range_with_a_typical_opt():
    assert trt_build.axis_ranges(ENCODER) == {"batch": (1, 1, 64), "sequence": (1, 128, 512)}
    assert trt_build.axis_ranges(ENCODER, "batch=4")["batch"] == (4, 4, 4)  # N fixes the axis
    assert trt_build.axis_ranges(ENCODER, "seq=16:64")["sequence"] == (16, 64, 64)  # MIN:MAX, opt clamped
    assert trt_build.axis_ranges(ENCODER, {"batch": (2, 3, 5)})["batch"] == (2, 3, 5)


def test_decoder_total_sequence_is_past_plus_new_capped_at_the_context():
    ranges = trt_build.axis_ranges(DECODER, "batch=1:1:4,seq=1:1:512,past=0:512:1536")
    assert ranges["total_sequence"] == (1, 513, 2048)
    shapes = trt_build.profiles(DECODER, "batch=1:1:4,seq=1:1:512,past=0:512:1536")
    assert shapes["attention_mask"] == ((1, 1), (1, 513), (4, 2048))
    assert shapes["past_key_values.0.key"] == ((1, 2, 0, 64), (1, 2, 512, 64), (4, 2, 1536, 64))
    # defaults: past 0..2047 and sequence 1..2048 would reach 4095 tokens; the context is 2048
    assert trt_build.axis_ranges(DECODER)["total_sequence"] == (1, 256, 2048)


@pytest.mark.parametrize("request_, match", [
    ("batch=1:8:128", r"batch=1:8:128 leaves the range the artifact was exported for \(1\.\.64\)"),
    ("batch=8:4:16", "need MIN <= OPT <= MAX"),
    ("beam=1:2:3", "no dynamic axis 'beam'; its axes are batch, sequence"),
    ("batch=1:x:3", "write AXIS=MIN:OPT:MAX"),
    ("batch=1:2:3:4", "write AXIS=MIN:OPT:MAX"),
    ("=1:2", "write AXIS=MIN:OPT:MAX"),
])
def test_bad_profiles_name_the_axis(request_, match):
    with pytest.raises(InputError, match=match):
        trt_build.profiles(ENCODER, request_)


def test_derived_axis_cannot_be_requested():
    with pytest.raises(InputError, match="total_sequence: it is past_sequence \\+ sequence"):
        trt_build.profiles(DECODER, "total_sequence=1:2:3")


def test_cache_key_changes_with_every_ingredient():
    shapes = trt_build.profiles(ENCODER, "batch=1:8:32")
    base = dict(onnx_sha256="ab" * 32, trt_version="10.14.1", compute_capability="9.0", profiles=shapes,
                precision="fp16")
    key = trt_build.cache_key(**base)
    assert key == trt_build.cache_key(**base) and len(key) == 24 and int(key, 16) >= 0
    changes = [{"onnx_sha256": "cd" * 32}, {"trt_version": "10.15.0"}, {"compute_capability": "8.9"},
               {"profiles": trt_build.profiles(ENCODER, "batch=1:8:33")}, {"precision": "fp32"}]
    keys = {trt_build.cache_key(**{**base, **change}) for change in changes}
    keys.add(trt_build.cache_key(**base, version_compatible=True))
    assert key not in keys and len(keys) == len(changes) + 1


def test_precision_plan():
    fp32 = trt_build.precision_plan("fp32")
    assert (fp32.dtype, fp32.graph_pass, fp32.keep_fp32_ops) == ("float32", False, ())
    for name, dtype in (("fp16", "float16"), ("bf16", "bfloat16")):
        plan = trt_build.precision_plan(name)
        assert (plan.dtype, plan.graph_pass) == (dtype, True)
        kept = {"LayerNormalization", "RMSNormalization", "Softmax", "ReduceMean", "ReduceSum"}
        assert kept <= set(plan.keep_fp32_ops)
        assert trt_build.precision_plan(name, artifact_precision=name).graph_pass is False  # typed at export
    with pytest.raises(InputError, match="choose one of fp32, fp16, bf16"):
        trt_build.precision_plan("int8")
    with pytest.raises(InputError, match="exported at fp16; build it with --precision fp16"):
        trt_build.precision_plan("bf16", artifact_precision="fp16")
    with pytest.raises(InputError, match="TensorRT does not build"):
        trt_build.precision_plan("fp16", artifact_precision="int8")


def test_engine_path(tmp_path):
    assert trt_build.engine_path(tmp_path, "0123abcd" * 3) == tmp_path / "engines" / f"{'0123abcd' * 3}.plan"
    with pytest.raises(ValueError):
        trt_build.engine_path(tmp_path, "../../etc/passwd")


def test_recording_an_engine_keeps_the_artifact_verifiable(artifacts, tmp_path):
    artifact = tmp_path / "art"
    shutil.copytree(artifacts("bert", "feature-extraction"), artifact)
    (artifact / "engines").mkdir()
    (artifact / "engines" / "aa.plan").write_bytes(b"plan")
    for key in ("aa", "bb", "aa"):  # the same key again replaces its entry
        trt_build._record(artifact, {"key": key, "file": f"engines/{key}.plan"})
    assert [e["key"] for e in load_manifest(artifact)["engines"]] == ["bb", "aa"]
    verify(artifact)  # engines/ is outside the exported file list, and kiln.json stays valid JSON
    assert not list((artifact / "engines").glob(".*.tmp"))


@pytest.mark.skipif(tensorrt_version() is not None, reason="TensorRT is installed: the missing-TensorRT path is moot")
def test_build_without_tensorrt_says_what_to_install(artifacts, capsys):
    artifact = artifacts("bert", "feature-extraction")
    what = r"pip install 'kiln\[tensorrt\]'.*TensorRT itself comes from NVIDIA"
    with pytest.raises(MissingDependencyError, match=what):
        trt_build.build(artifact)
    assert main(["build", str(artifact), "--precision", "fp16", "--profile", "batch=1:2:8"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kiln build: Building a TensorRT engine needs the 'tensorrt' package")
    assert "pypi.nvidia.com" in err
    assert load_manifest(artifact)["engines"] == [] and not (artifact / "engines").exists()


def test_build_rejects_a_bad_profile_before_looking_for_tensorrt(artifacts, capsys):
    assert main(["build", str(artifacts("bert", "feature-extraction")), "--profile", "batch=1:8:999"]) == 1
    assert "batch=1:8:999 leaves the range the artifact was exported for (1..8)" in capsys.readouterr().err


# A real build needs TensorRT and a GPU; the GPU is probed only when TensorRT imports.
NO_TENSORRT_GPU = TENSORRT_MISSING if tensorrt_version() is None else (
    "needs an NVIDIA GPU (CUDA found none)" if gpu_compute_capability() is None else None)
needs_tensorrt_gpu = pytest.mark.skipif(NO_TENSORRT_GPU is not None, reason=NO_TENSORRT_GPU or "")


@needs_tensorrt_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_runs_and_reuses_an_encoder_engine(artifacts, tmp_path, precision):
    from kiln.runtime.engines import open_engine

    artifact = tmp_path / "art"
    shutil.copytree(artifacts("bert", "feature-extraction"), artifact)
    cache = tmp_path / "timing.cache"
    entry = trt_build.build(artifact, precision=precision, profile="batch=1:2:8,seq=1:16:64", timing_cache=cache)
    assert (artifact / entry["file"]).is_file() and cache.is_file()
    assert trt_build.build(artifact, precision=precision, profile="batch=1:2:8,seq=1:16:64") == entry  # reused
    assert json.loads((artifact / "kiln.json").read_text())["engines"] == [entry]
    engine, reference = open_engine(artifact, device="tensorrt"), open_engine(artifact, device="cpu")
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(5, 50, (2, 11)), "attention_mask": np.ones((2, 11), np.int64),
            "token_type_ids": np.zeros((2, 11), np.int64)}
    feed = {i.name: feed[i.name] for i in reference.inputs()}
    want, got = reference.run(feed), engine.run(feed)
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=tolerance, rtol=tolerance, err_msg=name)
