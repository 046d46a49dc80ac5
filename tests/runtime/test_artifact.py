"""Broken artifacts give kiln's own errors that name the file and the fix."""

from __future__ import annotations

import json
import shutil

import pytest

import kiln
from kiln.artifact import artifact_file, load_manifest
from kiln.errors import ArtifactError, InputError
from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine


@pytest.fixture
def copy(artifacts, tmp_path):
    target = tmp_path / "art"
    shutil.copytree(artifacts("bert", "text-classification"), target)
    return target


def edit_manifest(path, **changes):
    manifest = json.loads((path / "kiln.json").read_text())
    manifest.update(changes)
    (path / "kiln.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("breakage, message", [
    (lambda p: (p / "kiln.json").unlink(), "is not a kiln artifact"),
    (lambda p: (p / "kiln.json").write_text("{oops"), "kiln.json is not valid JSON"),
    (lambda p: (p / "kiln.json").write_text("[]"), "must hold a JSON object"),
    (lambda p: edit_manifest(p, format_version=99), "format_version 99"),
    (lambda p: edit_manifest(p, model="../../etc/passwd"), "outside the artifact"),
    (lambda p: (p / "model.onnx").unlink(), "the file is missing"),
    (lambda p: (p / "model.onnx").write_bytes(b"\x08\x01garbage" * 10), "onnxruntime could not load"),
    (lambda p: (p / "tokenizer.json").unlink(), "No tokenizer.json"),
    (lambda p: (p / "tokenizer.json").write_text("{not a tokenizer"), "could not be read by tokenizers"),
    (lambda p: (p / "tokenizer_config.json").write_text("{"), "tokenizer_config.json is not valid JSON"),
    (lambda p: (p / "config.json").write_text("{"), "config.json is not valid JSON"),
])
def test_broken_artifact(breakage, message, copy):
    breakage(copy)
    with pytest.raises(ArtifactError, match=message):
        kiln.pipeline("text-classification", copy)


def test_artifact_file_refuses_escapes(copy):
    assert artifact_file(copy, "model.onnx") == (copy / "model.onnx").resolve()
    with pytest.raises(ArtifactError):
        artifact_file(copy, "/etc/passwd")


def test_engine_checks_the_feed(copy):
    import numpy as np

    engine = OnnxRuntimeEngine(copy / load_manifest(copy)["model"])
    ids = np.ones((1, 4), dtype=np.int64)
    with pytest.raises(InputError, match="'attention_mask' is missing"):
        engine.run({"input_ids": ids, "token_type_ids": ids})
    with pytest.raises(InputError, match="must be int64, got float32"):
        engine.run({"input_ids": ids.astype(np.float32), "attention_mask": ids, "token_type_ids": ids})
    with pytest.raises(InputError, match="must have 2 dims"):
        engine.run({"input_ids": ids[0], "attention_mask": ids, "token_type_ids": ids})
    out = engine.run({"input_ids": ids.astype(np.int32), "attention_mask": ids, "token_type_ids": ids})
    assert out["logits"].shape == (1, 3)
    with pytest.raises(InputError, match="Unknown device"):
        OnnxRuntimeEngine(copy / "model.onnx", device="tpu")


def test_verify_accepts_the_exported_artifact_and_refuses_tampering(copy, capsys):
    from kiln.artifact import verify
    from kiln.cli.__main__ import main

    verify(copy)
    assert set(load_manifest(copy)["files"]) >= {"model.onnx", "config.json", "tokenizer.json"}
    assert main(["run", str(copy), "hello", "--verify"]) == 0
    capsys.readouterr()

    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the weights
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.onnx does not match the sha256"):
        kiln.pipeline("text-classification", copy, verify=True)
    assert main(["run", str(copy), "hello", "--verify"]) == 1
    assert "does not match the sha256" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda p: (p / "vocab_extra.txt").write_text("x"), "not exported with it: vocab_extra.txt"),
    (lambda p: (p / "tokenizer.json").unlink(), "tokenizer.json is listed in kiln.json but missing"),
    (lambda p: edit_manifest(p, files={"../outside": "0" * 64}), "outside the artifact"),
    (lambda p: edit_manifest(p, files={}), "records no file hashes"),
])
def test_verify_names_what_is_wrong(change, message, copy):
    from kiln.artifact import verify

    change(copy)
    with pytest.raises(ArtifactError, match=message):
        verify(copy)
