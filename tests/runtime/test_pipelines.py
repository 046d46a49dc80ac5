"""kiln pipelines vs transformers.pipeline on the same weights: same structure, values within 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_same  # noqa: F401  (also imported from here by other test modules)

import kiln
from kiln.errors import ArtifactError, InputError

TEXTS = ["Hello, world! I love Paris.", "the movie was terrible", "a", "paris is the capital city of france and the river runs through it"]
PAIRS = [{"text": "is paris in france", "text_pair": "paris is the capital city of france"},
         {"text": "hello", "text_pair": "world"}]


def hf_pipeline(task, path, **options):
    import transformers

    return transformers.pipeline(task, model=str(path), tokenizer=str(path), device="cpu", **options)



@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_feature_extraction_matches_transformers(model_type, checkpoints, artifacts):
    path, _ = checkpoints(model_type, "feature-extraction")
    ours = kiln.pipeline("feature-extraction", artifacts(model_type, "feature-extraction"))
    theirs = hf_pipeline("feature-extraction", path)
    assert_same(ours(TEXTS[0]), theirs(TEXTS[0]))
    assert_same(ours(TEXTS), theirs(TEXTS))  # batched with padding inside kiln; transformers runs one by one


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_pooled_embeddings(model_type, checkpoints, artifacts):
    import torch
    from transformers import AutoTokenizer

    path, model = checkpoints(model_type, "feature-extraction")
    pipe = kiln.pipeline("feature-extraction", artifacts(model_type, "feature-extraction"))
    got_mean = np.array(pipe(TEXTS, pooling="mean", normalize=True))
    got_cls = np.array(pipe(TEXTS, pooling="cls"))
    enc = AutoTokenizer.from_pretrained(path)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    mean = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(got_mean, mean, atol=1e-5)
    np.testing.assert_allclose(got_cls, hidden[:, 0].numpy(), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got_mean, axis=-1), 1.0, atol=1e-6)
    arrays = pipe(TEXTS, pooling="mean", return_tensors=True)
    assert isinstance(arrays[0], np.ndarray) and arrays[0].shape == (32,)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("kwargs", [{}, {"top_k": 1}, {"top_k": 2}, {"top_k": None}, {"function_to_apply": "sigmoid"},
                                    {"function_to_apply": "none", "top_k": None}])
def test_text_classification_matches_transformers(model_type, kwargs, checkpoints, artifacts):
    path, _ = checkpoints(model_type, "text-classification")
    ours = kiln.pipeline("text-classification", artifacts(model_type, "text-classification"))
    theirs = hf_pipeline("text-classification", path)
    assert_same(ours(TEXTS[1], **kwargs), theirs(TEXTS[1], **kwargs))
    assert_same(ours(TEXTS, **kwargs), theirs(TEXTS, **kwargs))
    assert_same(ours(PAIRS, **kwargs), theirs(PAIRS, **kwargs))
    assert_same(ours(PAIRS[0], **kwargs), theirs(PAIRS[0], **kwargs))


@pytest.mark.parametrize("problem_type, extra", [("multi_label_classification", {}), ("regression", {"num_labels": 1})])
def test_problem_types_choose_the_score_function(problem_type, extra, tmp_path):
    from conftest import make_checkpoint

    if extra:
        extra = {"id2label": {0: "SCORE"}, "label2id": {"SCORE": 0}}
    path, _ = make_checkpoint(tmp_path / "ckpt", "bert", "text-classification", problem_type=problem_type, **extra)
    kiln.export(str(path), tmp_path / "art", task="text-classification", batch="1:4", seq="1:32")
    ours = kiln.pipeline("text-classification", tmp_path / "art")
    theirs = hf_pipeline("text-classification", path)
    for kwargs in ({}, {"top_k": None}):
        assert_same(ours(TEXTS[:2], **kwargs), theirs(TEXTS[:2], **kwargs))
    if problem_type == "multi_label_classification":
        scores = [d["score"] for d in ours(TEXTS[0], top_k=None)]
        assert abs(sum(scores) - 1) > 1e-3  # sigmoid, not softmax


def test_truncates_long_input_with_a_warning(artifacts, caplog):
    pipe = kiln.pipeline("feature-extraction", artifacts("bert", "feature-extraction"))
    long_text = " ".join(["paris"] * 500)
    with caplog.at_level("WARNING", logger="kiln"):
        out = pipe(long_text)
    assert np.array(out).shape == (1, 64, 32)  # the tiny model's maximum
    assert "Truncated 1 input" in caplog.text
    with pytest.raises(InputError, match="longer than the model's maximum"):
        pipe(long_text, truncation=False)


@pytest.mark.parametrize("bad, message", [
    ([], "empty"),
    (None, "string or a list of strings"),
    (42, "string or a list of strings"),
    (["ok", 3], "item 1 is int"),
    (b"bytes", "decode it"),
])
def test_bad_inputs_give_clear_errors(bad, message, artifacts):
    pipe = kiln.pipeline("text-classification", artifacts("bert", "text-classification"))
    with pytest.raises(InputError, match=message):
        pipe(bad)


def test_bad_options(artifacts):
    fe = kiln.pipeline("feature-extraction", artifacts("bert", "feature-extraction"))
    with pytest.raises(InputError, match="pooling"):
        fe("x", pooling="max")
    with pytest.raises(InputError, match="needs a pooling"):
        fe("x", normalize=True)
    tc = kiln.pipeline("text-classification", artifacts("bert", "text-classification"))
    with pytest.raises(InputError, match="function_to_apply"):
        tc("x", function_to_apply="relu")
    with pytest.raises(InputError, match="top_k"):
        tc("x", top_k=0)
    with pytest.raises(InputError, match="top_k must be a positive integer or None, got True"):
        tc("x", top_k=True)  # a bool is not a count
    with pytest.raises(InputError, match="Unknown task"):
        kiln.pipeline("summarization", artifacts("bert", "feature-extraction"))


def test_empty_string_is_a_valid_input(checkpoints, artifacts):
    path, _ = checkpoints("bert", "text-classification")
    ours = kiln.pipeline("text-classification", artifacts("bert", "text-classification"))
    assert_same(ours(""), hf_pipeline("text-classification", path)(""))


def test_task_mismatch_names_the_artifact_task(artifacts):
    with pytest.raises(ArtifactError, match="exported for 'feature-extraction'"):
        kiln.pipeline("text-classification", artifacts("bert", "feature-extraction"))


def test_pipeline_from_a_plain_checkpoint_exports_once_into_the_cache(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    path, _ = checkpoints("bert", "text-classification")
    first = kiln.pipeline("text-classification", str(path))
    cached = list((tmp_path / "cache" / "artifacts").iterdir())
    assert [p for p in cached if p.is_dir()] == [first.path]
    mtime = (first.path / "kiln.json").stat().st_mtime_ns
    second = kiln.pipeline("text-classification", str(path))
    assert second.path == first.path and (first.path / "kiln.json").stat().st_mtime_ns == mtime
    assert_same(second(TEXTS), hf_pipeline("text-classification", path)(TEXTS))


# ------------------------------------------------------------------------- options, tasks and inputs as transformers'

@pytest.mark.parametrize("options, call", [
    ({"top_k": 2}, {}), ({"top_k": 2}, {"top_k": 1}), ({"top_k": None}, {}), ({"function_to_apply": "sigmoid"}, {}),
    ({"function_to_apply": "sigmoid", "top_k": 1}, {"function_to_apply": "none"}), ({"truncation": True}, {})])
def test_text_classification_options_at_construction_match_transformers(options, call, checkpoints, artifacts):
    path, _ = checkpoints("bert", "text-classification")
    ours = kiln.pipeline("sentiment-analysis", artifacts("bert", "text-classification"), **options)
    theirs = hf_pipeline("sentiment-analysis", path, **options)
    assert ours.task == "text-classification"
    for inputs in (TEXTS[1], TEXTS, PAIRS[0], PAIRS):
        assert_same(ours(inputs, **call), theirs(inputs, **call))  # a string made with top_k: a list of one list
    assert_same(list(ours((t for t in TEXTS), **call)), list(theirs((t for t in TEXTS), **call)))


def test_feature_extraction_options_at_construction(checkpoints, artifacts):
    path, _ = checkpoints("bert", "feature-extraction")
    art = artifacts("bert", "feature-extraction")
    long_text = " ".join(["paris"] * 100)
    ours, theirs = kiln.pipeline("feature-extraction", art, truncation=True), hf_pipeline("feature-extraction", path,
                                                                                         truncation=True)
    assert_same(ours(long_text), theirs(long_text))
    assert_same(list(ours(t for t in TEXTS)), list(theirs(t for t in TEXTS)))
    pooled, plain = kiln.pipeline("feature-extraction", art, pooling="mean", normalize=True), kiln.pipeline(
        "feature-extraction", art)
    assert_same(pooled(TEXTS), plain(TEXTS, pooling="mean", normalize=True))
    # a call's option overrides the construction's, the others stay
    assert_same(pooled(TEXTS[0], pooling="cls"), plain(TEXTS[0], pooling="cls", normalize=True))
    with pytest.raises(InputError, match="pooling must be one of"):
        kiln.pipeline("feature-extraction", art, pooling="max")


def test_the_task_comes_from_the_artifact(checkpoints, artifacts):
    from kiln.runtime import pipeline as runtime_pipeline

    art = artifacts("bert", "text-classification")
    for pipe in (kiln.pipeline(model=art), kiln.pipeline(task=None, model=art), kiln.pipeline(None, art),
                 runtime_pipeline(None, art)):
        assert pipe.task == "text-classification"
    assert_same(kiln.pipeline(model=art)(TEXTS), kiln.pipeline("text-classification", art)(TEXTS))
    path, _ = checkpoints("bert", "text-classification")
    with pytest.raises(InputError, match="is a checkpoint, not a kiln artifact, so kiln cannot tell its task: pass it"):
        kiln.pipeline(model=str(path))
    with pytest.raises(InputError, match="needs a model"):
        kiln.pipeline("text-classification")
    with pytest.raises(ArtifactError, match="exported for 'text-classification'"):
        kiln.pipeline("ner", art)  # an alias that disagrees with the artifact


def test_unknown_options_are_refused_with_the_valid_ones(artifacts):
    art = artifacts("bert", "text-classification")
    message = (r"Unknown text-classification option\(s\) \['normalise'\]; the options are function_to_apply, top_k, "
               "truncation, batch_size and head_mask")
    with pytest.raises(InputError, match=message):
        kiln.pipeline("text-classification", art)("x", normalise=True)
    with pytest.raises(InputError, match=message):
        kiln.pipeline("text-classification", art, normalise=True)
    with pytest.raises(InputError, match="top_k must be"):
        kiln.pipeline("text-classification", art, top_k=0)
    with pytest.raises(InputError, match=r"Unknown feature-extraction option\(s\) \['top_k'\]"):
        kiln.pipeline("feature-extraction", artifacts("bert", "feature-extraction"))("x", top_k=2)


def test_iterators_stream_results_lazily_in_batches(artifacts):
    pipe = kiln.pipeline("feature-extraction", artifacts("bert", "feature-extraction"), batch_size=2)
    taken, runs, run = [], [], pipe.engine.run

    def counted_run(feed, *args, **kwargs):
        runs.append(len(feed["input_ids"]))
        return run(feed, *args, **kwargs)

    def texts():
        for text in TEXTS:
            taken.append(text)
            yield text

    pipe.engine.run = counted_run
    results = pipe(texts(), pooling="mean")
    assert taken == [] and runs == []  # nothing is read before a result is asked for
    first = next(results)
    assert len(taken) == 2 and runs == [2]  # one batch
    second = next(results)
    assert len(taken) == 2 and runs == [2]  # from the same batch
    rest = list(results)
    assert len(taken) == 4 and runs == [2, 2]
    assert_same([first, second, *rest], pipe(TEXTS, pooling="mean"))
    runs.clear()
    pipe(TEXTS, pooling="mean", batch_size=4)  # batch_size at call, as transformers takes it
    pipe(TEXTS[:2], pooling="mean", batch_size=1)
    assert runs == [4, 1, 1]
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        pipe(TEXTS, batch_size=0)

