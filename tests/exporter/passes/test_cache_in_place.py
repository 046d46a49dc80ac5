"""The KV cache written in place (passes/cache_in_place.py) against the standard Attention node it replaces: the same
logits and the same cache, left padding included, whatever the buffer's capacity and whatever stale values lie past
the filled positions; and the runtime's side (DecoderSession's buffers, chunked prefill, a cut-back or gathered
cache) giving the tokens of the concatenating graph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import kiln
from conftest import decoder_feed, run_graph
from kiln.errors import InputError
from kiln.exporter import passes
from kiln.exporter.passes.cache_in_place import CacheInPlace
from kiln.exporter.plan import Step
from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine
from kiln.runtime.generate import DecoderSession, GenerationConfig, generate
from kiln.runtime.generate import loop

LAYERS = 2


def three_d(path) -> ir.Model:
    """The traced decoder after the passes that run before this one (rotary, 3-D attention, packing)."""
    model = ir.load(str(path))
    passes.run(model, [Step("rotary"), Step("decoder-attention-3d"), Step("pack-projections")])
    return model


@pytest.fixture(scope="module")
def graphs(traced):
    path = traced("llama", "text-generation") / "model.onnx"
    before, after = three_d(path), three_d(path)
    result = CacheInPlace()(after)
    assert result.rewritten == 1 and result.details == {"layers": LAYERS}
    return before, after


def buffered_run(graph, feed: dict, capacity: int, rows=False) -> tuple[dict, dict]:
    """The in-place graph's outputs for a concatenating feed whose pasts were copied into buffers of ``capacity``
    positions holding large stale values past them, each bound as its layer's past and present as the runtime binds
    it (the buffers as they were before the run returned too). ``rows``: run one row at a time (onnxruntime's kernel takes several
    tokens over a non-empty cache for one row only)."""
    import onnxruntime as ort

    session = ort.InferenceSession(ir.serde.serialize_model(graph).SerializeToString())
    stale = np.random.default_rng(1)
    buffered = dict(feed)
    for name, past in feed.items():
        if name.startswith("past_key_values."):
            buffer = stale.standard_normal((*past.shape[:2], capacity, past.shape[3])).astype(np.float32) * 50
            buffer[:, :, :past.shape[2]] = past
            buffered[name] = buffer
    original = {name: value.copy() for name, value in buffered.items()}
    names, inputs = [v.name for v in graph.graph.outputs], {i.name for i in session.get_inputs()}
    parts = []
    for part in ([slice(row, row + 1) for row in range(len(feed["input_ids"]))] if rows else [slice(None)]):
        binding = session.io_binding()
        for name in inputs:
            value = buffered[name][part]
            if name.startswith("past_key_values."):
                buffer = ort.OrtValue.ortvalue_from_numpy(value)  # a row of the buffer: written in place
                binding.bind_ortvalue_input(name, buffer)
                binding.bind_ortvalue_output("present." + name.removeprefix("past_key_values."), buffer)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output("logits")
        session.run_with_iobinding(binding)
        parts.append(binding.get_outputs()[-1].numpy())  # bound last
    got = {name: buffered["past_key_values." + name.removeprefix("present.")] for name in names if name != "logits"}
    return {"logits": np.concatenate(parts), **got}, original


@pytest.mark.parametrize("seq, past", [(6, 3), (1, 8)])  # a chunk of a prompt, row by row; a decode step, batched
def test_same_logits_and_cache_over_a_bigger_buffer(graphs, seq, past):
    before, after = graphs
    feed = decoder_feed(before.graph.inputs, batch=2, seq=seq, past=past)  # row 1 left-padded
    want = dict(zip([v.name for v in before.graph.outputs], run_graph(before, feed)))
    total = seq + past
    got, buffered = buffered_run(after, feed, total + 5, rows=seq > 1)
    valid = feed["attention_mask"][:, past:] == 1
    np.testing.assert_allclose(got["logits"][valid], want["logits"][valid], atol=1e-5)
    for name in want:
        if name.startswith("present."):
            buffer = buffered["past_key_values." + name.removeprefix("present.")]
            filled = feed["attention_mask"].astype(bool)  # a padded position's entry is never attended
            np.testing.assert_allclose(got[name][:, :, :total].transpose(0, 2, 1, 3)[filled],
                                       want[name].transpose(0, 2, 1, 3)[filled], atol=1e-5)
            np.testing.assert_array_equal(got[name][:, :, total:], buffer[:, :, total:])  # nothing past the step


def test_the_graph_has_no_standard_attention_left(graphs):
    _, after = graphs
    ops = [n.op_type for n in after.graph]
    assert ops.count("Attention") == 0 and ops.count("GroupQueryAttention") == LAYERS
    assert "com.microsoft" in after.opset_imports
    # nothing around the kernel but the rotary nodes: no reshape, transpose or score tensor per layer
    assert ops.count("Transpose") == ops.count("Softmax") == 0
    past = next(v for v in after.graph.inputs if v.name == "past_key_values.0.key")
    assert str(past.shape[2]) == "cache_capacity"


def test_all_or_nothing(traced):
    """A graph with one layer outside the pattern (here a soft-capped one) keeps every layer as it is: the runtime
    handles one cache convention per graph."""
    model = three_d(traced("llama", "text-generation") / "model.onnx")
    attention = [n for n in model.graph if n.op_type == "Attention"]
    attention[1].attributes["softcap"] = ir.AttrFloat32("softcap", 30.0)
    result = CacheInPlace()(model)
    assert result.rewritten == 0 and "soft-caps" in next(iter(result.skipped))
    assert sum(n.op_type == "Attention" for n in model.graph) == LAYERS


@pytest.fixture(scope="module")
def sessions(traced, tmp_path_factory):
    """The same checkpoint as an in-place artifact (the default export) and a standard one (--attention onnx)."""
    standard = traced("llama", "text-generation")
    in_place = tmp_path_factory.mktemp("in-place") / "artifact"
    kiln.export(str(standard.parent / "checkpoint"), in_place, task="text-generation", batch="1:4")
    made = DecoderSession(OnnxRuntimeEngine(in_place / "model.onnx")), \
        DecoderSession(OnnxRuntimeEngine(standard / "model.onnx"))
    assert made[0].in_place and not made[1].in_place
    return made


def prompts():
    ids = np.random.default_rng(2).integers(3, 100, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    return np.where(mask == 1, ids, 2), mask


def test_generation_equals_the_standard_graph(sessions, monkeypatch):
    in_place, standard = sessions
    ids, mask = prompts()
    config = GenerationConfig(max_new_tokens=12, eos_token_id=None)
    want = generate(standard, ids, mask, config)
    np.testing.assert_array_equal(generate(in_place, ids, mask, config), want)
    monkeypatch.setattr(loop, "PREFILL_CHUNK", 2)  # the 9-token prompts in 5 passes
    np.testing.assert_array_equal(generate(in_place, ids, mask, config), want)


def test_steps_write_into_one_buffer(sessions):
    session, _ = sessions
    ids, mask = prompts()
    cache = session.empty_cache(2, capacity=12)
    buffer = cache["past_key_values.0.key"].base
    positions = loop.position_ids(mask)
    logits, cache = session.step(ids, mask, positions, cache)
    for _ in range(3):
        assert cache["past_key_values.0.key"].base is buffer  # a view of the same buffer: nothing copied
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        logits, cache = session.step(logits.argmax(-1)[:, None], mask, positions, cache)
    assert cache["past_key_values.0.key"].shape[2] == 12 and cache["past_key_values.0.key"].base is buffer
    # Full: the next step moves the cache into a new buffer with room to spare.
    mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    _, grown = session.step(logits.argmax(-1)[:, None], mask, positions[:, -1:] + 1, cache)
    assert grown["past_key_values.0.key"].base is not buffer
    assert grown["past_key_values.0.key"].base.shape[2] == 13 + loop.HEADROOM
    np.testing.assert_array_equal(grown["past_key_values.0.key"][:, :, :12], cache["past_key_values.0.key"])


def test_a_gathered_or_cut_cache_gives_the_standard_graphs_logits(sessions):
    """What beam search (rows gathered) and prompt lookup (positions cut back) do to the cache."""
    ids, mask = prompts()
    results = []
    for session in sessions:
        _, cache = session.step(ids, mask, loop.position_ids(mask), session.empty_cache(2, capacity=20))
        cache = {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v)[[1, 1, 0]] for k, v in cache.items()}
        mask3 = mask[[1, 1, 0]]
        step_ids = np.array([[5, 6], [7, 8], [9, 10]])
        mask4 = np.concatenate([mask3, np.ones((3, 2), np.int64)], axis=1)
        positions = loop.position_ids(mask4)[:, -2:]
        logits, cache = session.step(step_ids, mask4, positions, cache)
        cut = {k: v[:, :, :10] if isinstance(v, np.ndarray) else v.numpy()[:, :, :10] for k, v in cache.items()}
        again, _ = session.step(np.array([[11], [12], [13]]), mask4, loop.position_ids(mask4)[:, -1:], cut)
        results.append((logits, again))
    np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-5)
    np.testing.assert_allclose(results[0][1], results[1][1], atol=1e-5)


def test_a_mask_that_disagrees_with_the_cache_is_refused(sessions):
    session, _ = sessions
    ids, mask = prompts()
    _, cache = session.step(ids, mask, loop.position_ids(mask), session.empty_cache(2, capacity=12))
    with pytest.raises(InputError, match="attention_mask says 8 came before"):
        session.step(ids[:, :1], mask, np.zeros((2, 1), np.int64), cache)  # the mask not grown by the new token


def test_the_inverse_gives_the_standard_node_back(graphs):
    """kiln build's first TensorRT pass (CacheConcat): one Attention node per layer with past and present again,
    computing what the graph before CacheInPlace computes."""
    from kiln.exporter.passes.cache_in_place import CacheConcat

    before, after = graphs
    restored = ir.from_proto(ir.to_proto(after))
    result = CacheConcat()(restored)
    assert result.rewritten == LAYERS
    ops = [n.op_type for n in restored.graph]
    assert ops.count("Attention") == LAYERS and ops.count("GroupQueryAttention") == 0
    past = next(v for v in restored.graph.inputs if v.name == "past_key_values.1.value")
    assert str(past.shape[2]) == "past_sequence"
    feed = decoder_feed(before.graph.inputs, batch=2, seq=4, past=5)
    for a, b in zip(run_graph(before, feed), run_graph(restored, feed), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5)
