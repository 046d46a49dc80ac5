"""Bad requests (issue 8, item 5): oversized batches and sequences, wrong dtypes and shapes in raw engine feeds, text
that is not valid Unicode, NaN images. Each gets a clear InputError (or documented handling), and the runtime never
returns an output whose shape disagrees with the input.

The tiny artifacts are exported with --batch 1:8 --seq 1:64 (tests/conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.errors import ArtifactError, InputError
from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine
from kiln.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def artifact(artifacts):
    return artifacts("bert", "feature-extraction")


@pytest.fixture(scope="module")
def engine(artifact):
    return OnnxRuntimeEngine(artifact / "model.onnx", threads=1)


def feed(batch: int, seq: int, dtype=np.int64, **overrides) -> dict:
    ids = np.full((batch, seq), 7, dtype=dtype)
    base = {"input_ids": ids, "attention_mask": np.ones((batch, seq), dtype=dtype),
            "token_type_ids": np.zeros((batch, seq), dtype=dtype)}
    return {**base, **overrides}


# ------------------------------------------------------------------------------- sizes beyond the exported ranges
@pytest.mark.parametrize("batch, seq, message", [
    (9, 4, r"'input_ids' has batch = 9, outside the range 1\.\.8 .*--batch"),
    (1, 65, r"'input_ids' has sequence = 65, outside the range 1\.\.64 .*--seq"),
    (1, 1000, r"sequence = 1000, outside the range 1\.\.64"),
    (0, 4, r"batch = 0, outside the range 1\.\.8"),
    (1, 0, r"sequence = 0, outside the range 1\.\.64"),
])
def test_sizes_outside_the_exported_ranges_are_refused(engine, batch, seq, message):
    with pytest.raises(InputError, match=message):
        engine.run(feed(batch, seq))


def test_the_edges_of_the_ranges_run(engine):
    for batch, seq in ((1, 1), (8, 64), (8, 1), (1, 64)):
        out = engine.run(feed(batch, seq))
        assert out["last_hidden_state"].shape == (batch, seq, 32)


def test_a_pipeline_stays_inside_the_batch_range(artifact):
    """A batch_size above the exported maximum is lowered to it; long inputs are cut to the sequence maximum."""
    pipe = kiln.pipeline("feature-extraction", artifact, batch_size=32, threads=1)
    assert pipe.batch_size == 8
    texts = [f"the movie {'was great ' * (i % 5)}number {i}" for i in range(21)]
    together = pipe(texts, pooling="mean")
    alone = [pipe(text, pooling="mean") for text in texts]
    assert len(together) == 21 and np.allclose(together, alone, atol=1e-5)
    long = "hello world " * 100  # ~200 tokens against a maximum of 64
    assert len(pipe(long)[0]) == 64
    with pytest.raises(InputError, match="longer than the model's maximum of 64 tokens"):
        pipe(long, truncation=False)


# ------------------------------------------------------------------------------------------ raw engine feeds
@pytest.mark.parametrize("overrides, message", [
    ({"input_ids": np.full((1, 4), 7.0, dtype=np.float32)}, "'input_ids' must be int64, got float32"),
    ({"input_ids": np.full((1, 4), 7.0)}, "'input_ids' must be int64, got float64"),
    ({"input_ids": np.array([["a", "b", "c", "d"]])}, "'input_ids' must be int64, got <U1"),
    ({"input_ids": np.array([[1, None, 2, 3]], dtype=object)}, "'input_ids' must be int64, got object"),
    ({"input_ids": [[1, 2], [3]]}, "'input_ids' is not a rectangular array"),
    ({"input_ids": np.full(4, 7)}, "'input_ids' must have 2 dims"),
    ({"input_ids": np.full((1, 4, 1), 7)}, "'input_ids' must have 2 dims"),
    ({"attention_mask": np.ones((2, 4), dtype=np.int64)}, r"Axis 'batch' is 2 in input 'attention_mask' but 1"),
    ({"token_type_ids": np.zeros((1, 5), dtype=np.int64)}, r"Axis 'sequence' is 5 in input 'token_type_ids' but 4"),
    ({"input_ids": np.array([[1, 2, -3, 4]])}, "'input_ids' holds negative values"),
    ({"input_ids": np.full((1, 4), 2**63 + 5, dtype=np.uint64)}, "'input_ids' holds negative values"),
    ({"input_ids": np.array([[1, 2, 3, 10**6]])}, "onnxruntime rejected the feed.*below the vocabulary size"),
    ({"input_ids": None}, "'input_ids' must be int64, got object"),
    ({"labels": np.zeros((1,), dtype=np.int64)}, r"input\(s\) \['labels'\] that the graph does not take"),
])
def test_wrong_feeds_are_refused(engine, overrides, message):
    with pytest.raises(InputError, match=message):
        engine.run(feed(1, 4, **overrides))


def test_missing_input_and_unknown_output(engine):
    broken = feed(1, 4)
    del broken["attention_mask"]
    with pytest.raises(InputError, match="'attention_mask' is missing"):
        engine.run(broken)
    with pytest.raises(InputError, match=r"no output\(s\) \['logits'\]"):
        engine.run(feed(1, 4), outputs=["logits"])


def test_same_kind_casts_are_accepted(engine):
    """int32 ids (what some tokenizers return) are cast to the graph's int64 and give the same result."""
    expected = engine.run(feed(2, 5))["last_hidden_state"]
    assert np.array_equal(engine.run(feed(2, 5, dtype=np.int32))["last_hidden_state"], expected)


def test_output_shapes_follow_the_input(engine):
    for batch, seq in ((1, 3), (3, 17), (8, 64)):
        out = engine.run(feed(batch, seq))
        assert out["last_hidden_state"].shape == (batch, seq, 32)
        assert out.get("pooler_output", np.zeros((batch, 32))).shape == (batch, 32)


def test_a_graph_that_returns_a_wrong_shape_is_refused(tmp_path):
    """A damaged graph whose output declares (batch, 3) but returns one row for any batch: refused, not returned."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 3])
    y = helper.make_tensor_value_info("logits", TensorProto.INT64, ["batch", 3])
    starts, ends = (helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("starts", 0), ("ends", 1)))
    graph = helper.make_graph([helper.make_node("Slice", ["input_ids", "starts", "ends"], ["logits"])], "g", [x], [y],
                              [starts, ends])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "model.onnx")
    engine = OnnxRuntimeEngine(tmp_path / "model.onnx", threads=1)
    assert engine.run({"input_ids": np.ones((1, 3), dtype=np.int64)})["logits"].shape == (1, 3)
    with pytest.raises(ArtifactError, match=r"returned 'logits' of shape \(1, 3\).*means \(4, 3\)"):
        engine.run({"input_ids": np.ones((4, 3), dtype=np.int64)})


# -------------------------------------------------------------------------------------- text that is not Unicode
LONE_SURROGATES = ["\ud800", "caf\udce9", "ok \udcff then", b"caf\xe9".decode("utf-8", "surrogateescape")]


@pytest.mark.parametrize("text", LONE_SURROGATES)
def test_lone_surrogates_are_refused_clearly(artifact, text):
    pipe = kiln.pipeline("feature-extraction", artifact, threads=1)
    with pytest.raises(InputError, match="not valid Unicode: it holds the lone surrogate"):
        pipe(text)
    with pytest.raises(InputError, match="input 1 is not valid Unicode"):
        pipe(["fine", text])


def test_lone_surrogates_in_pairs_windows_and_targets(artifacts):
    clf = kiln.pipeline("text-classification", artifacts("bert", "text-classification"), threads=1)
    with pytest.raises(InputError, match="text_pair is not valid Unicode"):
        clf({"text": "fine", "text_pair": "bad \ud800"})
    tok = Tokenizer.from_dir(artifacts("bert", "feature-extraction"))
    with pytest.raises(InputError, match="context is not valid Unicode"):  # question answering's windows
        tok.windows([("a question", "a \udc80 context")], max_length=32, stride=4, names=("question", "context"))
    with pytest.raises(InputError, match="text is not valid Unicode"):  # fill-mask targets
        tok.encode_ids("\ud83d")


@pytest.mark.parametrize("data", [b"hello", b"caf\xe9 \xff\xfe", "héllo".encode("utf-16")])
def test_bytes_are_refused_with_the_fix(artifact, data):
    pipe = kiln.pipeline("feature-extraction", artifact, threads=1)
    with pytest.raises(InputError, match=r"is bytes; decode it to str first.*errors='replace'"):
        pipe(data)


def test_valid_unicode_beyond_the_basic_plane_works(artifact):
    pipe = kiln.pipeline("feature-extraction", artifact, threads=1)
    assert len(pipe("emoji \U0001f600 and \u00e9\u0301 combining", pooling="mean")) == 32


# ------------------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_in_image_arrays_are_refused(bad):
    pytest.importorskip("PIL")
    from kiln.runtime.image_processor import ImageProcessor

    processor = ImageProcessor({"size": {"height": 8, "width": 8}})
    image = np.full((8, 8, 3), 0.5, dtype=np.float32)
    image[3, 4, 1] = bad
    with pytest.raises(InputError, match="NaN or infinite"):
        processor([image])
    assert processor([np.full((8, 8, 3), 0.5, dtype=np.float32)]).pixel_values.shape == (1, 3, 8, 8)
