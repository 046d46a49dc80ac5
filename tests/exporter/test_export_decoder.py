"""The LLaMA family's one-graph decoder export: the KV cache written in place (or one Attention node per layer, with
--attention onnx), Optimum's input/output names, and in onnxruntime a run with the KV cache equals a run without it,
for grouped-query (Llama, 2 kv heads) and multi-query (Qwen2, 1 kv head) attention."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import transformers

import kiln
from kiln.artifact import load_manifest
from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine

LAYERS, HEADS, DIM, VOCAB = 2, 4, 8, 100
MODELS = {"llama-gqa": ("llama", 2), "qwen2-mqa": ("qwen2", 1), "qwen3-gqa": ("qwen3", 2)}  # -> (model_type, kv heads)


def make_checkpoint(path, model_type: str, kv_heads: int):
    config = transformers.AutoConfig.for_model(
        model_type, hidden_size=HEADS * DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=kv_heads, head_dim=DIM, intermediate_size=37, vocab_size=VOCAB, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init leaves the norms at 1 and biases at 0: perturb them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    model_type, kv_heads = MODELS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    theirs = make_checkpoint(root / "checkpoint", model_type, kv_heads)
    kiln.export(str(root / "checkpoint"), root / "artifact", task="text-generation", batch="1:4")
    return root / "artifact", theirs, kv_heads


def left_padded(lengths, T: int, seed: int = 0):
    """(ids, mask, position_ids) as batched generation pads: on the left, positions counting real tokens only."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(T)[None, :] >= T - np.array(lengths)[:, None]).astype(np.int64)  # (B, T)
    ids = np.where(mask == 1, rng.integers(3, VOCAB, size=mask.shape), 0).astype(np.int64)
    return ids, mask, np.clip(mask.cumsum(-1) - 1, 0, None)


def ort_feed(ids, mask, pos, kv_heads: int, past: dict | None = None, capacity: int = 0) -> dict:
    """A graph feed; with ``past`` (a previous run's outputs) its presents become the past, else the past is empty
    (for onnxruntime's own session.run on an in-place graph: a buffer of ``capacity`` positions)."""
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i in range(LAYERS):
        for kind in ("key", "value"):
            empty = np.zeros((ids.shape[0], kv_heads, capacity, DIM), np.float32)  # (B, Hkv, P=0, D)
            feed[f"past_key_values.{i}.{kind}"] = past[f"present.{i}.{kind}"] if past else empty
    return feed


def test_graph_writes_the_cache_in_place_with_optimum_names(exported):
    artifact, _, kv_heads = exported
    assert load_manifest(artifact)["validation"]["passed"]
    model = onnx.load(str(artifact / "model.onnx"))
    graph = model.graph
    counts = Counter(n.op_type for n in graph.node)
    # Each layer's attention: one GroupQueryAttention over the cache buffers, which it writes in place
    # (passes/cache_in_place.py).
    assert counts["Attention"] == 0 and counts["GroupQueryAttention"] == LAYERS
    assert counts["TensorScatter"] == counts["Softmax"] == 0
    assert load_manifest(artifact)["attention"]["cache"] == "in-place"
    # RoPE as one standard RotaryEmbedding per query and key tensor (passes/rotary.py), nothing of rotate_half left.
    assert counts["RotaryEmbedding"] == 2 * LAYERS
    assert [n.name for n in graph.node if n.op_type == "Neg"] == ["logits_to_keep_neg"]  # none from rotate_half
    assert load_manifest(artifact)["attention"]["rotary_nodes"] == 2 * LAYERS
    # RoPE takes (B, T, C) straight from the projections (decoder_3d) and so does the attention: no Transpose, no
    # head split. Qwen3's per-head q/k norms keep a (free) Reshape to (B, T, H, D) and back around them.
    qk_norms = counts["RMSNormalization"] - (2 * LAYERS + 1)
    assert counts["Transpose"] == 0 and counts["Reshape"] == 2 * qk_norms
    assert qk_norms == (2 * LAYERS if "qwen3" in artifact.parent.name else 0)
    assert load_manifest(artifact)["attention"]["form"] == "onnx-3d"
    # q/k/v and gate/up read one activation each: one packed MatMul and a Split apiece (passes/pack.py).
    assert counts["MatMul"] == 4 * LAYERS + 1 and counts["Split"] == 2 * LAYERS
    kinds = ("key", "value")
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "position_ids",
                                             *(f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in kinds),
                                             "logits_to_keep"]
    assert [o.name for o in graph.output] == ["logits", *(f"present.{i}.{k}" for i in range(LAYERS) for k in kinds)]
    capacity = [d.dim_param for d in graph.input[3].type.tensor_type.shape.dim]
    assert capacity == ["batch", "", "cache_capacity", ""]
    # logits_to_keep (passes/logits.py) is an input with a default: an initializer callers may override.
    assert [i.name for i in graph.initializer if i.name == "logits_to_keep"] == ["logits_to_keep"]
    assert load_manifest(artifact)["optional_inputs"] == [
        {"name": "logits_to_keep", "dtype": "int64", "shape": [], "default": 0}]


def test_traced_attention_keeps_rotate_half_and_agrees(exported, tmp_path):
    """--attention onnx keeps the graph as traced (for TensorRT); both graphs give the same logits."""
    artifact, _, kv_heads = exported
    source = load_manifest(artifact)["source"]["path"]
    kiln.export(source, tmp_path / "traced", task="text-generation", batch="1:4", attention="onnx")
    counts = Counter(n.op_type for n in onnx.load(str(tmp_path / "traced" / "model.onnx")).graph.node)
    assert counts["RotaryEmbedding"] == 0 and counts["Neg"] == 2 * LAYERS + 1  # rotate_half's, logits_to_keep's
    rng = np.random.default_rng(3)
    ids = rng.integers(0, VOCAB, (2, 6))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(6), (2, 1))}
    for i in range(LAYERS):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((2, kv_heads, 0, DIM), np.float32)
    fused = OnnxRuntimeEngine(artifact / "model.onnx").run(feed)["logits"]
    traced = OnnxRuntimeEngine(tmp_path / "traced" / "model.onnx").run(feed)["logits"]
    np.testing.assert_allclose(fused, traced, atol=1e-5)


def test_onnxruntime_cache_equals_no_cache(exported):
    artifact, theirs, kv_heads = exported
    engine = OnnxRuntimeEngine(artifact / "model.onnx")
    ids, mask, pos = left_padded([7, 4], 7)
    full = engine.run(ort_feed(ids, mask, pos, kv_heads))
    with torch.no_grad():  # the graph without a cache agrees with transformers at the real tokens
        want = theirs(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      position_ids=torch.from_numpy(pos)).logits.numpy()
    assert np.abs(full["logits"] - want)[mask == 1].max() < 1e-4
    # Prefix, then the last token with the prefix's presents as the past.
    prefix = engine.run(ort_feed(ids[:, :-1], mask[:, :-1], pos[:, :-1], kv_heads))
    step = engine.run(ort_feed(ids[:, -1:], mask, pos[:, -1:], kv_heads, past=prefix))
    assert step["present.0.key"].shape == (2, kv_heads, 7, DIM)  # (B, Hkv, S, D)
    np.testing.assert_allclose(step["logits"][:, -1], full["logits"][:, -1], atol=1e-4)
    # A second decode step on top of the first cache.
    ids2 = np.array([[5], [6]], dtype=np.int64)
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    pos2 = pos[:, -1:] + 1
    step2 = engine.run(ort_feed(ids2, mask2, pos2, kv_heads, past=step))
    full2 = engine.run(ort_feed(np.concatenate([ids, ids2], 1), mask2, np.concatenate([pos, pos2], 1), kv_heads))
    np.testing.assert_allclose(step2["logits"][:, -1], full2["logits"][:, -1], atol=1e-4)


@pytest.mark.parametrize("keep", [0, 1, 3])
def test_logits_to_keep_is_transformers_argument(exported, keep):
    """Fed ``logits_to_keep=k``, the graph returns the last k positions' logits (0: all), as transformers' forward
    does with the same argument; not fed, every position, as before the pass."""
    artifact, theirs, kv_heads = exported
    engine = OnnxRuntimeEngine(artifact / "model.onnx")
    ids, mask, pos = left_padded([6, 3], 6, seed=1)
    feed = ort_feed(ids, mask, pos, kv_heads, capacity=6)  # onnxruntime alone: the graph's cache buffers
    full = engine.session.run(["logits"], feed)[0]
    kept = engine.session.run(["logits"], {**feed, "logits_to_keep": np.array(keep, np.int64)})[0]
    with torch.no_grad():
        want = theirs(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(pos),
                      logits_to_keep=keep).logits.numpy()
    assert full.shape == (2, 6, VOCAB) and kept.shape == want.shape == (2, keep or 6, VOCAB)
    np.testing.assert_array_equal(kept, full[:, -keep:] if keep else full)
    rows = mask[:, -kept.shape[1]:] == 1  # transformers' logits at padded positions are not comparable
    assert np.abs(kept - want)[rows].max() < 1e-4


def test_decoder_session_prefills_only_the_last_position(exported):
    """The runtime's decode loop feeds logits_to_keep=1: the same last-position logits and cache as a full run."""
    from kiln.runtime.generate import DecoderSession

    artifact, _, kv_heads = exported
    engine = OnnxRuntimeEngine(artifact / "model.onnx")
    session = DecoderSession(engine)
    assert session.keep_last
    ids, mask, pos = left_padded([5, 2], 5, seed=2)
    logits, cache = session.step(ids, mask, pos, session.empty_cache(2))
    full = engine.run(ort_feed(ids, mask, pos, kv_heads))
    assert logits.shape == (2, VOCAB)
    np.testing.assert_allclose(logits, full["logits"][:, -1], atol=1e-6)
    cached = cache["past_key_values.1.value"]  # a view of the buffer the graph wrote into
    assert isinstance(cached, np.ndarray) and cached.shape == full["present.1.value"].shape
    np.testing.assert_allclose(cached, full["present.1.value"], atol=1e-6)


def test_inspect_lists_the_optional_input(exported, capsys):
    from kiln.cli.__main__ import main

    artifact, _, _ = exported
    assert main(["inspect", str(artifact)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "logits_to_keep" in line)
    assert line.split() == ["logits_to_keep", "int64", "[]", "optional,", "default", "0"]
