"""Gemma 2 / Gemma 3 decoder export: one Attention node per layer (Gemma 2's carrying its soft-cap), RoPE fused with
the local layers' own base, logits_to_keep through the final soft-capping, and in onnxruntime the graph equals
transformers, with and without the cache, past the sliding window."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

import kiln
from conftest import make_causal_lm
from kiln.artifact import load_manifest
from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine

LAYERS, KV_HEADS, DIM, VOCAB, WINDOW = 3, 2, 8, 97, 4
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=LAYERS, num_attention_heads=4,
             num_key_value_heads=KV_HEADS, head_dim=DIM, max_position_embeddings=64, query_pre_attn_scalar=16,
             sliding_window=WINDOW)
MODELS = {"gemma2": ("gemma2", dict(attn_logit_softcapping=5.0, final_logit_softcapping=4.0)),
          "gemma3": ("gemma3_text", dict(sliding_window_pattern=2))}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    model_type, flags = MODELS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    theirs = make_causal_lm(root / "checkpoint", model_type, **SIZES, **flags)
    kiln.export(str(root / "checkpoint"), root / "artifact", task="text-generation", batch="1:4")
    return request.param, root / "artifact", theirs


def feed(ids, mask, pos, past: dict | None = None) -> dict:
    """A graph feed; with ``past`` (a previous run's outputs) its presents become the past, else the past is empty."""
    out = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i in range(LAYERS):
        for kind in ("key", "value"):
            empty = np.zeros((ids.shape[0], KV_HEADS, 0, DIM), np.float32)  # (B, Hkv, P=0, D)
            out[f"past_key_values.{i}.{kind}"] = past[f"present.{i}.{kind}"] if past else empty
    return out


def test_graph_is_fused_and_records_the_form(exported):
    name, artifact, _ = exported
    manifest = load_manifest(artifact)
    assert manifest["validation"]["passed"] and manifest["attention"]["form"] == "onnx-3d"
    graph = onnx.load(str(artifact / "model.onnx")).graph
    counts = Counter(n.op_type for n in graph.node)
    assert counts["RotaryEmbedding"] == 2 * LAYERS
    caps = [{a.name: a.f for a in n.attribute}.get("softcap", 0.0) for n in graph.node if n.op_type == "Attention"]
    if name == "gemma2":  # soft-capped scores: every layer keeps the standard node and its concatenated cache
        assert caps == [5.0] * LAYERS and manifest["attention"]["cache"] == "concat"
    else:  # Gemma 3's global layer writes its cache in place; the two local ones keep their window-bounded cache
        assert caps == [0.0, 0.0] and counts["GroupQueryAttention"] == 1 and manifest["attention"]["cache"] == "in-place"
    assert counts["Cos"] == (2 if name == "gemma3" else 1)  # Gemma 3's local layers have their own RoPE base
    assert manifest["optional_inputs"] == [{"name": "logits_to_keep", "dtype": "int64", "shape": [], "default": 0}]


def test_onnxruntime_equals_transformers_with_and_without_cache(exported):
    _, artifact, theirs = exported
    engine = OnnxRuntimeEngine(artifact / "model.onnx")
    T = 3 * WINDOW
    rng = np.random.default_rng(0)
    mask = np.ones((2, T), np.int64)
    mask[1, :5] = 0  # left padding
    ids = np.where(mask == 1, rng.integers(3, VOCAB, size=mask.shape), 0).astype(np.int64)
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    full = engine.run(feed(ids, mask, pos))
    with torch.no_grad():
        want = theirs(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      position_ids=torch.from_numpy(pos)).logits.numpy()
    assert np.abs(full["logits"] - want)[mask == 1].max() < 1e-4
    # A prefix as long as the window, then one token at a time: each step equals the full forward.
    out = engine.run(feed(ids[:, :WINDOW], mask[:, :WINDOW], pos[:, :WINDOW]))
    for t in range(WINDOW, T):
        out = engine.run(feed(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], past=out))
        real = mask[:, t] == 1  # a padding query has no defined output
        np.testing.assert_allclose(out["logits"][real, -1], full["logits"][real, t], atol=1e-4)
    # Layers 0 and 2 are local: their cache holds the window (less the next token), layer 1's the whole context.
    assert [out[f"present.{i}.key"].shape[2] for i in range(LAYERS)] == [WINDOW - 1, T, WINDOW - 1]
    assert full["present.0.value"].shape[2] == WINDOW - 1  # a long prefill keeps no more
    assert load_manifest(artifact)["dynamic_axes"]["past_window"] == {"min": 0, "max": WINDOW - 1}


def test_logits_to_keep_sees_through_the_soft_cap(exported):
    _, artifact, _ = exported
    engine = OnnxRuntimeEngine(artifact / "model.onnx")
    ids = np.random.default_rng(1).integers(3, VOCAB, (2, 7))
    base = feed(ids, np.ones_like(ids), np.tile(np.arange(7), (2, 1)))
    every = engine.run(base)["logits"]
    last = engine.run({**base, "logits_to_keep": np.array(2, np.int64)})["logits"]
    assert last.shape == (2, 2, VOCAB)
    np.testing.assert_allclose(last, every[:, -2:], atol=1e-6)
