"""kiln fill-mask vs transformers.pipeline on the same weights: top_k, targets, several masks, lists, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from test_pipelines import assert_same, hf_pipeline

import kiln
from kiln.errors import ArtifactError, InputError

TASK = "fill-mask"
# Tokens of each tiny vocabulary (byte-level BPE marks a leading space with Ġ).
TARGETS = {"bert": ["paris", "london", "the", "##s"], "roberta": ["Ġthe", "Ġworld", "Ġruns", "a"]}


def texts(mask: str) -> list[str]:
    return [f"the capital of france is {mask}.", f"hello {mask}, i love {mask} paris", mask, f"{mask} runs fast"]


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """(checkpoint, artifact, mask token) per model_type, initialised wider than the shared fixtures
    (initializer_range 0.3) so the best token gets ~0.1-0.15 rather than ~1/vocab: a 1e-4 tolerance then means
    something and the ranking is not a near tie."""
    from conftest import make_checkpoint

    cache = {}

    def get(model_type: str):
        if model_type not in cache:
            root = tmp_path_factory.mktemp(f"peaked-{model_type}-{TASK}")
            path, _ = make_checkpoint(root / "checkpoint", model_type, TASK, initializer_range=0.3)
            kiln.export(str(path), root / "artifact", task=TASK, batch="1:8", seq="1:64")
            cache[model_type] = (path, root / "artifact")
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("kwargs", [{}, {"top_k": 1}, {"top_k": 3}, {"top_k": None}, {"targets": "target"},
                                    {"targets": "targets"}, {"targets": "targets", "top_k": 2},
                                    {"targets": "targets", "top_k": 10}])
def test_matches_transformers(model_type, kwargs, peaked):
    path, artifact = peaked(model_type)
    ours = kiln.pipeline(TASK, artifact, batch_size=3)  # several padded batches
    theirs = hf_pipeline(TASK, path)
    if "targets" in kwargs:
        kwargs = {**kwargs, "targets": TARGETS[model_type][0] if kwargs["targets"] == "target" else TARGETS[model_type]}
    inputs = texts(ours.mask_token)
    assert_same(ours(inputs[0], **kwargs), theirs(inputs[0], **kwargs))  # one mask: a list of candidates
    assert_same(ours(inputs[1], **kwargs), theirs(inputs[1], **kwargs))  # two masks: a list per mask
    assert_same(ours(inputs, **kwargs), theirs(inputs, **kwargs))
    assert_same(ours(inputs[1:2], **kwargs), theirs(inputs[1:2], **kwargs))  # a one-item list is unwrapped


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_options_at_construction_and_generators_match_transformers(model_type, peaked):
    path, artifact = peaked(model_type)
    options = {"top_k": 2, "targets": TARGETS[model_type]}
    ours, theirs = kiln.pipeline(TASK, artifact, batch_size=3, **options), hf_pipeline(TASK, path, **options)
    inputs = texts(ours.mask_token)
    assert_same(ours(inputs[0]), theirs(inputs[0]))
    assert_same(ours(inputs, top_k=3), theirs(inputs, top_k=3))  # the call's top_k, the construction's targets
    assert_same(list(ours(t for t in inputs)), list(theirs(t for t in inputs)))


def test_scores_are_meaningful(peaked):
    """Guards the comparison above: the best candidate clearly beats the uniform 1/vocab."""
    pipe = kiln.pipeline(TASK, peaked("bert")[1])
    best = pipe(texts(pipe.mask_token)[0], top_k=1)[0]
    assert best["score"] > 0.05 > 10 / pipe.config["vocab_size"]


def test_targets_outside_the_vocabulary_use_their_first_token(peaked, caplog):
    path, artifact = peaked("bert")
    ours, theirs = kiln.pipeline(TASK, artifact), hf_pipeline(TASK, path)
    text = texts(ours.mask_token)[0]
    targets = ["zz", "", "paris", "london"]
    with caplog.at_level("WARNING", logger="kiln"):
        got = ours(text, targets=targets)
    assert "The specified target token `zz` does not exist in the model vocabulary. Replacing with `z`." in caplog.text
    assert "target token `` does not exist in the model vocabulary. We cannot replace it" in caplog.text
    assert_same(got, theirs(text, targets=targets))
    with pytest.raises(InputError, match="At least one target"):
        ours(text, targets=["", " "])
    with pytest.raises(ValueError, match="At least one target"):  # transformers agrees
        theirs(text, targets=["", " "])


def test_distilbert(checkpoints, artifacts):
    path, _ = checkpoints("distilbert", TASK)
    ours, theirs = kiln.pipeline(TASK, artifacts("distilbert", TASK)), hf_pipeline(TASK, path)
    inputs = texts(ours.mask_token)
    assert_same(ours(inputs, top_k=3), theirs(inputs, top_k=3))


def test_output_shapes(peaked):
    pipe = kiln.pipeline(TASK, peaked("bert")[1])
    one, two = texts(pipe.mask_token)[:2]
    assert list(pipe(one)[0]) == ["score", "token", "token_str", "sequence"] and len(pipe(one)) == 5
    assert [len(row) for row in pipe(two, top_k=2)] == [2, 2]
    assert pipe([one]) == pipe(one)
    vocab = pipe.config["vocab_size"]
    assert len(pipe(one, top_k=vocab + 10)) == vocab  # capped at the candidates (transformers' topk would raise)


def test_no_mask_names_the_mask_token(peaked):
    path, artifact = peaked("roberta")
    ours, theirs = kiln.pipeline(TASK, artifact), hf_pipeline(TASK, path)
    for bad in ("no mask here", "", ["<mask> is fine", "this one has none"]):
        with pytest.raises(InputError, match=r"No mask_token \(<mask>\) found"):
            ours(bad)
        with pytest.raises(Exception, match=r"No mask_token \(<mask>\) found"):  # transformers' PipelineException
            theirs(bad)


def test_mask_lost_to_truncation_says_so(peaked):
    pipe = kiln.pipeline(TASK, peaked("bert")[1])
    with pytest.raises(InputError, match="truncated to 64 tokens"):
        pipe("paris " * 100 + pipe.mask_token)


@pytest.mark.parametrize("bad, kwargs, message", [
    (42, {}, "string or a list of strings"),
    (["[MASK]", None], {}, "item 1 is NoneType"),
    ([], {}, "empty"),
    ("[MASK]", {"top_k": 0}, "top_k must be a positive integer"),
    ("[MASK]", {"top_k": "3"}, "top_k must be a positive integer"),
    ("[MASK]", {"targets": 3}, "targets must be a string or a list of strings"),
])
def test_bad_input(bad, kwargs, message, peaked):
    pipe = kiln.pipeline(TASK, peaked("bert")[1])
    with pytest.raises(InputError, match=message):
        pipe(bad, **kwargs)


def edit_tokenizer_config(directory, **changes):
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def test_mask_token_from_special_tokens_map_or_a_clear_error(peaked, tmp_path):
    artifact = shutil.copytree(peaked("bert")[1], tmp_path / "artifact")
    edit_tokenizer_config(artifact, mask_token=None)
    with pytest.raises(ArtifactError, match="mask_token"):
        kiln.pipeline(TASK, artifact)
    # Older checkpoints name their special tokens in special_tokens_map.json.
    (artifact / "special_tokens_map.json").write_text(json.dumps({"mask_token": {"content": "[MASK]"}}))
    assert kiln.pipeline(TASK, artifact).mask_token == "[MASK]"


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_clean_up_tokenization_spaces_like_transformers(model_type, peaked, tmp_path):
    """Real BERT checkpoints ask decode to drop the space before punctuation; transformers ignores that for BPE."""
    path, artifact = peaked(model_type)
    path, artifact = (shutil.copytree(d, tmp_path / name) for d, name in ((path, "checkpoint"), (artifact, "artifact")))
    for directory in (path, artifact):
        edit_tokenizer_config(directory, clean_up_tokenization_spaces=True)
    ours, theirs = kiln.pipeline(TASK, artifact), hf_pipeline(TASK, path)
    text = f"hello , i love {ours.mask_token} . is it ? yes !"
    got = ours(text)
    assert_same(got, theirs(text))
    assert ("hello, i love" in got[0]["sequence"]) == (model_type == "bert")


def test_cli_run(peaked, capsys):
    from kiln.cli.__main__ import main

    artifact = str(peaked("bert")[1])
    assert main(["run", artifact, "hello [MASK] world", "--top-k", "2", "--targets", "paris", "london", "the"]) == 0
    (line,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # one input: still one line
    expected = kiln.pipeline(TASK, artifact)("hello [MASK] world", top_k=2, targets=["paris", "london", "the"])
    assert line["output"] == expected
    assert main(["run", artifact, "[MASK] x [MASK]", "a [MASK]"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(line["output"]) for line in lines] == [2, 5]  # two masks; five candidates
