"""kiln export --precision auto: every CPU candidate exported through its gate, the ones that pass timed here
(interleaved), the fastest written; kiln.json's precision_auto says what was measured where."""

from __future__ import annotations

import pytest

import kiln
from kiln.artifact import load_manifest, verify
from kiln.errors import ExportError, InputError
from kiln.exporter.auto import choose

transformers = pytest.importorskip("transformers")


def test_choose_takes_the_fastest_that_passed():
    assert choose({"fp32": {"passed": True, "ms": 9.0}, "int8": {"passed": True, "ms": 5.0},
                   "int4": {"passed": False}}) == "int8"
    assert choose({"fp32": {"passed": True, "ms": 9.0}, "int8": {"passed": True, "ms": 7.0},
                   "int4": {"passed": True, "ms": 4.0}}) == "int4"
    assert choose({"fp32": {"passed": True, "ms": 5.0}, "int8": {"passed": True, "ms": 5.0}}) == "fp32"  # a tie
    with pytest.raises(ExportError, match="no candidate passed"):
        choose({"fp32": {"passed": False}})


def test_decoder_auto_measures_every_candidate_and_keeps_the_fastest(tmp_path):
    from conftest import make_causal_lm

    make_causal_lm(tmp_path / "ckpt", "llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    manifest = kiln.export(str(tmp_path / "ckpt"), tmp_path / "out", task="text-generation", precision="auto",
                           batch="1:4")
    auto = manifest["precision_auto"]
    assert list(auto["candidates"]) == ["fp32", "int8", "int4"] and auto["machine"]["isa"]
    timed = {p: c["ms"] for p, c in auto["candidates"].items() if c["passed"]}
    assert "fp32" in timed and all(ms > 0 for ms in timed.values())
    assert auto["chosen"] == min(timed, key=timed.get) == manifest["precision"]
    assert all("prefill_ms" in c for c in auto["candidates"].values() if c["passed"])
    for precision, record in auto["candidates"].items():  # a reduced one carries its gate's figures, or why it failed
        assert precision == "fp32" or ("accuracy" in record if record["passed"] else "reason" in record)
    assert load_manifest(tmp_path / "out") == manifest
    verify(tmp_path / "out")  # the files are the chosen candidate's, as kiln.json hashes them
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.auto-")]  # the candidates are gone


def test_encoder_auto_has_two_candidates(checkpoints, tmp_path):
    path, _ = checkpoints("bert", "feature-extraction")
    manifest = kiln.export(str(path), tmp_path / "out", precision="auto", batch="1:4", seq="1:64")
    auto = manifest["precision_auto"]
    assert list(auto["candidates"]) == ["fp32", "int8"] and auto["chosen"] == manifest["precision"]
    assert "forward pass" in auto["metric"]


def test_auto_refuses_what_it_cannot_choose(tmp_path, checkpoints):
    from whisper_tiny import save_tiny_whisper

    path, _ = checkpoints("bert", "feature-extraction")
    with pytest.raises(InputError, match="--force-precision would let one below it win"):
        kiln.export(str(path), tmp_path / "out", precision="auto", force_precision=True)
    save_tiny_whisper(tmp_path / "whisper")
    with pytest.raises(InputError, match="not measured for encoder-decoder artifacts"):
        kiln.export(tmp_path / "whisper", tmp_path / "out", task="automatic-speech-recognition", precision="auto")
    assert not (tmp_path / "out").exists()
