"""Pruning heads (the seed's promise; transformers 5 removed prune_heads, 4.57 is the oracle, run from .venv-hf457):
kiln's BERT pruning equals transformers 4.57's and each loads the other's pruned checkpoint; LLaMA prunes whole
grouped-query groups; pruned models export (each layer's fused node with its own head count), validate and
generate; `kiln prune` scores, prunes, exports and reports; bad requests are refused with the reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kiln
from conftest import TINY_LLAMA, make_causal_lm
from kiln.artifact import verify
from kiln.errors import ConfigError, InputError
from test_head_mask import IDS, oracle

PRUNE = {0: [1, 2], 1: [0, 3]}


def test_bert_pruning_equals_transformers_457_both_ways(checkpoints, tmp_path):
    path, _ = checkpoints("bert", "text-classification")
    ours = kiln.from_pretrained(path, task="text-classification")
    ours.prune_heads({0: [1, 2], 1: [0]})
    ours.prune_heads({1: [3]})  # a second call prunes more; indices stay those of the unpruned model
    assert ours.config.pruned_heads == {0: (1, 2), 1: (0, 3)}
    assert ours.bert.layers[0].attn.q.weight.shape == (16, 32) and ours.bert.layers[0].attn.o.weight.shape == (32, 16)
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["pruned_heads"] == {"0": [1, 2], "1": [0, 3]}
    inputs = {"input_ids": IDS, "attention_mask": [[1] * 6, [1, 1, 1, 1, 0, 0]]}
    theirs_pruned, theirs_loading_ours = oracle([
        {"model": str(path), "auto": "AutoModelForSequenceClassification", "prune": {str(k): v for k, v in PRUNE.items()},
         "save": str(tmp_path / "theirs"), "inputs": inputs, "outputs": ["logits", "attentions"]},
        {"model": str(tmp_path / "ours"), "auto": "AutoModelForSequenceClassification", "inputs": inputs,
         "outputs": ["logits"]}])
    with torch.no_grad():
        got = ours(**{k: torch.tensor(v) for k, v in inputs.items()}, output_attentions=True)
    np.testing.assert_allclose(got["logits"].numpy(), theirs_pruned["logits"], atol=1e-5)
    np.testing.assert_allclose(got["logits"].numpy(), theirs_loading_ours["logits"], atol=1e-5)
    assert [a.shape[1] for a in got["attentions"]] == [2, 2]
    np.testing.assert_allclose(got["attentions"][1].numpy(), theirs_pruned["attentions"][1], atol=1e-5)
    reloaded = kiln.from_pretrained(tmp_path / "theirs", task="text-classification")  # transformers' pruned file
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(**{k: torch.tensor(v) for k, v in inputs.items()})["logits"].numpy(),
                                   theirs_pruned["logits"], atol=1e-5)


@pytest.mark.parametrize("request_, message", [
    ({0: [0, 1, 2, 3]}, "pruning every head of layer 0"), ({2: [0]}, "layer 2 does not exist"),
    ({0: [4]}, "layer 0 has no head 4"), ({0: ["a"]}, "needs a list of head indices"), ({}, "takes {layer:")])
def test_bad_pruning_requests(checkpoints, request_, message):
    ours = kiln.from_pretrained(checkpoints("bert", "text-classification")[0], task="text-classification")
    with pytest.raises(InputError, match=message):
        ours.prune_heads(request_)
    ours.prune_heads({0: [1]})
    with pytest.raises(InputError, match=r"head\(s\) \[1\] of layer 0 were pruned already"):
        ours.prune_heads({0: [1, 2]})
    with pytest.raises(InputError, match="head_mask needs every head of every layer"):
        ours(input_ids=torch.tensor(IDS), head_mask=torch.ones(4))


def test_pruned_bert_exports_with_a_head_count_per_layer(checkpoints, tmp_path):
    path, _ = checkpoints("bert", "feature-extraction")
    ours = kiln.from_pretrained(path, task="feature-extraction")
    ours.prune_heads({0: [0, 1, 2]})
    ours.save_pretrained(tmp_path / "pruned")
    manifest = kiln.export(str(tmp_path / "pruned"), tmp_path / "out", output_attentions=True, batch="1:4",
                           seq="1:32")
    assert manifest["validation"]["passed"]
    shapes = {t["name"]: t["shape"] for t in manifest["outputs"]}
    assert shapes["attentions.0"][1] == 1 and shapes["attentions.1"][1] == 4
    with pytest.raises(ConfigError, match="only the PyTorch reference builds"):
        kiln.from_pretrained(tmp_path / "pruned", task="feature-extraction", framework="jax")


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])  # qwen3: its per-head q/k norms are shared by the heads
def test_llama_prunes_whole_groups_and_generates(tmp_path, model_type):
    from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine
    from kiln.runtime.generate import DecoderSession, GenerationConfig, generate

    make_causal_lm(tmp_path / "llama", model_type, **TINY_LLAMA)  # 4 query heads, 2 key/value heads: groups of 2
    ours = kiln.from_pretrained(tmp_path / "llama", task="text-generation")
    with pytest.raises(InputError, match=r"query heads \[0, 1\] share key/value head 0"):
        ours.prune_heads({0: [1]})
    ours.prune_heads({0: [2, 3]})
    attn = ours.layers[0].attn
    assert (attn.H, attn.Hkv, attn.k.weight.shape[0]) == (2, 1, attn.D)
    ours.save_pretrained(tmp_path / "pruned")
    manifest = kiln.export(str(tmp_path / "pruned"), tmp_path / "out", task="text-generation", batch="1:4")
    assert manifest["validation"]["passed"] and manifest["attention"]["form"] == "onnx-3d"
    past = {t["name"]: t["shape"][1] for t in manifest["inputs"] if t["name"].startswith("past_key_values.")}
    assert past == {"past_key_values.0.key": 1, "past_key_values.0.value": 1, "past_key_values.1.key": 2,
                    "past_key_values.1.value": 2}
    ids = np.array([[5, 6, 7, 8]])
    tokens = generate(DecoderSession(OnnxRuntimeEngine(tmp_path / "out" / "model.onnx")), ids, np.ones_like(ids),
                      GenerationConfig(max_new_tokens=5))
    reloaded, seq = kiln.from_pretrained(tmp_path / "pruned", task="text-generation"), torch.tensor(ids)
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, reloaded(seq)["logits"][:, -1].argmax(-1, keepdim=True)], 1)
    np.testing.assert_array_equal(tokens, seq[:, 4:].numpy())


def test_kiln_prune_scores_prunes_exports_and_reports(checkpoints, tmp_path, capsys):
    from kiln.cli.__main__ import main

    path, _ = checkpoints("bert", "text-classification")
    assert main(["prune", str(path), str(tmp_path / "out"), "--keep", "0.5", "--task", "text-classification",
                 "--batch", "1:16", "--seq", "1:64", "--save-checkpoint", str(tmp_path / "pruned")]) == 0
    line = capsys.readouterr().out
    assert "heads kept per layer" in line and "label_agreement" in line and "the unpruned artifact's speed" in line
    report = json.loads((tmp_path / "out" / "kiln.json").read_text())["pruning"]
    assert sum(report["heads_kept"]) == 4 and min(report["heads_kept"]) >= 1  # half of 8, a head per layer at least
    assert np.asarray(report["importance"]).shape == (2, 4) and report["speedup"] > 0
    assert set(report["accuracy"]) >= {"label_agreement", "gate", "passed"}
    assert report["accuracy"]["passed"] == (report["accuracy"]["label_agreement"] >= report["accuracy"]["gate"])
    pruned = {int(k): v for k, v in report["pruned_heads"].items()}
    scores = np.asarray(report["importance"])  # what went is what mattered least, layer by layer
    for layer, heads in pruned.items():
        kept = [h for h in range(4) if h not in heads]
        assert scores[layer, heads].max() <= scores[layer, kept].min()
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())["pruned_heads"]
    assert {int(k): v for k, v in saved.items()} == pruned
    verify(tmp_path / "out")  # the report went into kiln.json only: every exported file still matches
    assert kiln.pipeline("text-classification", tmp_path / "out")("i love paris")[0]["label"]


@pytest.mark.parametrize("keep", [0, 1, 1.5, True])
def test_prune_keep_must_be_a_fraction(checkpoints, tmp_path, keep):
    with pytest.raises(InputError, match="--keep is the fraction of heads to keep"):
        kiln.prune(str(checkpoints("bert", "feature-extraction")[0]), tmp_path / "x", keep=keep)


def test_families_without_pruning_say_so(vit_checkpoints, tmp_path):
    path, _ = vit_checkpoints("image-classification")
    with pytest.raises(InputError, match="model_type 'vit' has no head pruning"):
        kiln.prune(str(path), tmp_path / "x", task="image-classification")
