"""zero-shot-classification over an NLI text-classification artifact vs transformers.pipeline on the same weights."""

from __future__ import annotations

import json

import pytest
from conftest import assert_same, make_checkpoint

import kiln
from kiln.cli.__main__ import main
from kiln.errors import ArtifactError, InputError

NLI = ["contradiction", "neutral", "entailment"]
TEXTS = ["the movie was terrible", "paris is the capital city of france and the river runs through it", "a"]
LABELS = ["movie", "city", "river", "love"]


@pytest.fixture(scope="module")
def nli(tmp_path_factory):
    """A tiny random BERT NLI classifier (labels contradiction/neutral/entailment) and its artifact."""
    path = tmp_path_factory.mktemp("nli")
    make_checkpoint(path, "bert", "text-classification", id2label=dict(enumerate(NLI)),
                    label2id={label: i for i, label in enumerate(NLI)})
    out = path.parent / "nli-artifact"
    kiln.export(str(path), out, task="text-classification", batch="1:8", seq="1:64")
    return path, out


@pytest.fixture(scope="module")
def theirs(nli):
    import transformers

    return transformers.pipeline("zero-shot-classification", model=str(nli[0]), device="cpu")


@pytest.mark.parametrize("kwargs", [{}, {"multi_label": True}, {"hypothesis_template": "It is about {}."}])
def test_matches_transformers(nli, theirs, kwargs):
    ours = kiln.pipeline("zero-shot-classification", nli[1])
    assert_same(ours(TEXTS[0], candidate_labels=LABELS, **kwargs), theirs(TEXTS[0], candidate_labels=LABELS, **kwargs))
    # several sequences: one engine batch of rows (sequence x label), batch_size rows at a time
    assert_same(ours(TEXTS, candidate_labels=LABELS, batch_size=3, **kwargs),
                theirs(TEXTS, candidate_labels=LABELS, **kwargs))


def test_label_forms_and_single_label(nli, theirs):
    ours = kiln.pipeline("zero-shot-classification", nli[1], candidate_labels="movie, city")
    assert_same(ours(TEXTS[1]), theirs(TEXTS[1], "movie, city"))  # comma-separated, made with the pipeline
    assert_same(ours(TEXTS[1], ["river"]), theirs(TEXTS[1], ["river"]))  # positional; one label: multi-label scoring
    assert 0 < ours(TEXTS[1], ["river"])["scores"][0] < 1


def test_long_sequence_is_cut_not_the_hypothesis(nli, theirs):
    long = " ".join(["paris is the capital city of france"] * 20)  # > 64 tokens
    ours = kiln.pipeline("zero-shot-classification", nli[1])
    assert_same(ours(long, candidate_labels=LABELS), theirs(long, candidate_labels=LABELS))


def test_bad_input(nli, checkpoints, artifacts):
    ours = kiln.pipeline("zero-shot-classification", nli[1])
    with pytest.raises(InputError, match="needs candidate_labels"):
        ours(TEXTS[0])
    with pytest.raises(InputError, match="candidate_labels must be"):
        ours(TEXTS[0], candidate_labels=[])
    with pytest.raises(InputError, match="must contain"):
        ours(TEXTS[0], candidate_labels=LABELS, hypothesis_template="no place for it")
    with pytest.raises(InputError, match="once"):
        ours(TEXTS[0], LABELS, candidate_labels=LABELS)
    with pytest.raises(InputError, match="maximum of 64 tokens"):  # the hypothesis alone does not fit
        ours(TEXTS[0], candidate_labels=[" ".join(["paris"] * 80)])
    # a classifier without an entailment label, and an artifact of another task
    with pytest.raises(ArtifactError, match="not a natural-language-inference classifier.*NEGATIVE"):
        kiln.pipeline("zero-shot-classification", artifacts("bert", "text-classification"))
    with pytest.raises(ArtifactError, match="runs 'text-classification' artifacts"):
        kiln.pipeline("zero-shot-classification", artifacts("bert", "feature-extraction"))


def test_cli(nli, theirs, capsys):
    assert main(["run", str(nli[1]), TEXTS[0], "--candidate-labels", *LABELS, "--multi-label"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert_same(line["output"], theirs(TEXTS[0], candidate_labels=LABELS, multi_label=True))
    assert main(["run", str(nli[1]), TEXTS[0], "--task", "zero-shot-classification", "--candidate-labels", "movie",
                 "--hypothesis-template", "About {}."]) == 0
    assert json.loads(capsys.readouterr().out)["output"]["labels"] == ["movie"]


def test_from_a_checkpoint(nli, theirs):
    """A plain checkpoint is exported once as text-classification, the artifact zero-shot runs."""
    ours = kiln.pipeline("zero-shot-classification", str(nli[0]))
    assert_same(ours(TEXTS[0], LABELS), theirs(TEXTS[0], LABELS))
