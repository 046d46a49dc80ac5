"""kiln token-classification vs transformers.pipeline on the same weights: every aggregation strategy, ignore_labels,
single vs list shapes, unknown tokens, truncation and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_pipelines import assert_same, hf_pipeline

import kiln
from kiln.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore:Tokenizer does not support real words:UserWarning")  # transformers'

TASK = "token-classification"
STRATEGIES = ["none", "simple", "first", "average", "max"]
# Unknown words split into many pieces (WordPiece: "z ##q ##x ##w"; byte-level BPE: "Ġp aris i an"), so the word
# strategies have words of several tokens to disagree about. 北 and € are [UNK] for the tiny BERT vocabulary.
TEXTS = ["Hello zqxw parisian, berlin!", "Jxkq Vwpz lives in Berlinz and Parisxq.",
         "qqq london kiln runs fastly 北京 €5", "", "a"]


# Seeds whose random models predict all five labels on TEXTS (checked by test_the_strategies_see_subwords_and_disagree).
SEEDS = {"bert": 0, "roberta": 2}


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """(checkpoint, artifact) per model_type, initialised wider than the shared fixtures (initializer_range 0.2) so
    label probabilities spread over 0.2-0.8 instead of ~0.2 each: a 1e-4 tolerance then means something."""
    from conftest import make_checkpoint

    cache = {}

    def get(model_type: str):
        if model_type not in cache:
            root = tmp_path_factory.mktemp(f"peaked-{model_type}-{TASK}")
            path, _ = make_checkpoint(root / "checkpoint", model_type, TASK, seed=SEEDS[model_type],
                                      initializer_range=0.2)
            kiln.export(str(path), root / "artifact", task=TASK, batch="1:8", seq="1:64")
            cache[model_type] = (path, root / "artifact")
        return cache[model_type]

    return get


def plain(x):
    """transformers returns numpy float32 scores; compare them as Python numbers."""
    if isinstance(x, list):
        return [plain(v) for v in x]
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    return x.item() if isinstance(x, np.generic) else x


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_transformers(model_type, strategy, peaked):
    path, artifact = peaked(model_type)
    ours = kiln.pipeline(TASK, artifact, batch_size=2)  # several padded batches
    theirs = hf_pipeline(TASK, path)
    for ignore in (None, [], ["O", "B-PER"]):
        kwargs = {"aggregation_strategy": strategy} | ({} if ignore is None else {"ignore_labels": ignore})
        assert_same(ours(TEXTS[0], **kwargs), plain(theirs(TEXTS[0], **kwargs)))
        assert_same(ours(TEXTS, **kwargs), plain(theirs(TEXTS, **kwargs)))


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_options_at_construction_the_ner_alias_and_generators_match_transformers(model_type, peaked):
    path, artifact = peaked(model_type)
    options = {"aggregation_strategy": "simple", "ignore_labels": []}
    ours, theirs = kiln.pipeline("ner", artifact, batch_size=2, **options), hf_pipeline("ner", path, **options)
    assert ours.task == TASK
    assert_same(ours(TEXTS[0]), plain(theirs(TEXTS[0])))
    assert_same(ours(TEXTS, aggregation_strategy="first"), plain(theirs(TEXTS, aggregation_strategy="first")))
    assert_same(list(ours(t for t in TEXTS)), plain(list(theirs(t for t in TEXTS))))
    with pytest.raises(InputError, match="aggregation_strategy must be one of"):
        kiln.pipeline(TASK, artifact, aggregation_strategy="longest")


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_the_strategies_see_subwords_and_disagree(model_type, peaked):
    """Guards the comparison above: the texts must split words into pieces and make the strategies differ."""
    pipe = kiln.pipeline(TASK, peaked(model_type)[1])
    tokens = pipe(TEXTS[:3], ignore_labels=[])
    words = {strategy: pipe(TEXTS[:3], aggregation_strategy=strategy, ignore_labels=[]) for strategy in STRATEGIES[1:]}
    assert sum(len(t) for t in tokens) > sum(len(w) for w in words["first"])  # words of several tokens
    spans = {s: str([[(e["entity_group"], e["start"], e["end"]) for e in row] for row in out])
             for s, out in words.items()}
    assert len(set(spans.values())) >= 3  # at least three strategies group differently
    labels = {e["entity"] for row in tokens for e in row}
    assert len(labels) == 5  # every label, "O" included: the default ignore_labels actually drops something


def test_unknown_tokens_show_their_text(peaked):
    out = kiln.pipeline(TASK, peaked("bert")[1])(TEXTS[2], ignore_labels=[])
    words = [e["word"] for e in out]
    assert "北" in words and "[UNK]" not in words


def test_distilbert(checkpoints, artifacts):
    path, _ = checkpoints("distilbert", TASK)
    ours, theirs = kiln.pipeline(TASK, artifacts("distilbert", TASK)), hf_pipeline(TASK, path)
    for strategy in ("none", "average"):
        assert_same(ours(TEXTS, aggregation_strategy=strategy, ignore_labels=[]),
                    plain(theirs(TEXTS, aggregation_strategy=strategy, ignore_labels=[])))


def test_output_shapes(peaked):
    pipe = kiln.pipeline(TASK, peaked("bert")[1])
    one = pipe(TEXTS[0], ignore_labels=[])
    assert isinstance(one, list) and isinstance(one[0], dict)
    assert list(one[0]) == ["entity", "score", "index", "word", "start", "end"]
    assert pipe([TEXTS[0]], ignore_labels=[]) == [one]  # a one-item list stays a list of lists, as in transformers
    assert pipe("") == [] and pipe(["", ""]) == [[], []]
    grouped = pipe(TEXTS[0], aggregation_strategy="SIMPLE", ignore_labels=[])  # case-insensitive, as transformers
    assert list(grouped[0]) == ["entity_group", "score", "word", "start", "end"]


def test_long_input_is_truncated_like_transformers(peaked, caplog):
    path, artifact = peaked("bert")
    long_text = " ".join(["paris zqx"] * 60)
    with caplog.at_level("WARNING", logger="kiln"):
        got = kiln.pipeline(TASK, artifact)(long_text, aggregation_strategy="first", ignore_labels=[])
    assert "Truncated 1 input" in caplog.text
    assert_same(got, plain(hf_pipeline(TASK, path)(long_text, aggregation_strategy="first", ignore_labels=[])))


def test_word_strategies_warn_without_subword_markers(peaked, caplog):
    pipe = kiln.pipeline(TASK, peaked("roberta")[1])
    with caplog.at_level("WARNING", logger="kiln"):
        pipe(TEXTS[0], aggregation_strategy="max")
    assert "fallback heuristic" in caplog.text


@pytest.mark.parametrize("bad, kwargs, message", [
    (42, {}, "string or a list of strings"),
    (None, {}, "string or a list of strings"),
    (["ok", 3], {}, "item 1 is int"),
    ([], {}, "empty"),
    ("ok", {"aggregation_strategy": "longest"}, "aggregation_strategy must be one of"),
    ("ok", {"stride": 16}, "'stride' is not supported"),
    ("ok", {"is_split_into_words": True}, "not supported"),
])
def test_bad_input(bad, kwargs, message, peaked):
    pipe = kiln.pipeline(TASK, peaked("bert")[1])
    with pytest.raises(InputError, match=message):
        pipe(bad, **kwargs)


def test_cli_run(peaked, capsys):
    from kiln.cli.__main__ import main

    artifact = str(peaked("bert")[1])
    assert main(["run", artifact, TEXTS[0], TEXTS[1], "--aggregation-strategy", "first"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["output"] for line in lines] == kiln.pipeline(TASK, artifact)(TEXTS[:2], aggregation_strategy="first")
