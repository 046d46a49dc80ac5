"""The runtime tokenizer vs transformers' fast tokenizer: ids, masks, type ids, pairs, offsets, padding, truncation."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import InputError
from kiln.runtime.tokenizer import Tokenizer

TEXTS = ["Hello, world! I love Paris.", "", "the river runs through paris and london", "ümlaut café 3.14"]


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_matches_transformers(model_type, checkpoints):
    from transformers import AutoTokenizer

    path, _ = checkpoints(model_type, "feature-extraction")
    ours, theirs = Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)
    batch = ours(TEXTS)
    expected = theirs(TEXTS, padding=True, return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="np")
    np.testing.assert_array_equal(batch.input_ids, expected["input_ids"])
    np.testing.assert_array_equal(batch.attention_mask, expected["attention_mask"])
    if "token_type_ids" in expected:
        np.testing.assert_array_equal(batch.token_type_ids, expected["token_type_ids"])
    for b, offsets in enumerate(batch.offsets):
        n = int(batch.attention_mask[b].sum())
        assert offsets == [tuple(o) for o in expected["offset_mapping"][b][:n].tolist()]
    assert batch.input_ids.dtype == np.int64 and batch.truncated == [False] * len(TEXTS)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_pairs_match_transformers(model_type, checkpoints):
    from transformers import AutoTokenizer

    path, _ = checkpoints(model_type, "feature-extraction")
    ours, theirs = Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)
    firsts, seconds = ["is paris in france", "hello"], ["paris is the capital city of france", "world"]
    batch = ours(firsts, seconds)
    expected = theirs(firsts, seconds, padding=True, return_tensors="np")
    np.testing.assert_array_equal(batch.input_ids, expected["input_ids"])
    if "token_type_ids" in expected:
        np.testing.assert_array_equal(batch.token_type_ids, expected["token_type_ids"])


def test_truncation_to_the_model_maximum_matches_transformers(checkpoints, caplog):
    from transformers import AutoTokenizer

    path, _ = checkpoints("bert", "feature-extraction")
    ours, theirs = Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)
    text = "paris london " * 100
    with caplog.at_level("WARNING", logger="kiln"):
        batch = ours([text, "short"])
    assert batch.truncated == [True, False] and "Truncated 1 input(s) to 64 tokens" in caplog.text
    np.testing.assert_array_equal(batch.input_ids[0], theirs(text, truncation=True)["input_ids"])
    assert ours(text, max_length=10).input_ids.shape == (1, 10)


def test_left_padding_and_pad_token_from_config(checkpoints, tmp_path):
    import json
    import shutil

    path, _ = checkpoints("bert", "feature-extraction")
    shutil.copytree(path, tmp_path / "t")
    config = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    config["padding_side"] = "left"
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path / "t")
    batch = tok(["hello world paris", "hello"])
    assert batch.attention_mask[1].tolist()[:2] == [0, 0] and batch.input_ids[1, 0] == tok.pad_id == 0


def test_thread_safety_of_one_tokenizer(checkpoints):
    from concurrent.futures import ThreadPoolExecutor

    path, _ = checkpoints("bert", "feature-extraction")
    tok = Tokenizer.from_dir(path)
    serial = [tok([t], max_length=m).input_ids.tolist() for t in TEXTS for m in (5, 64)]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda a: tok([a[0]], max_length=a[1]).input_ids.tolist(),
                                 [(t, m) for t in TEXTS for m in (5, 64)] * 20))
    assert parallel == serial * 20


@pytest.mark.parametrize("bad, message", [([], "empty"), ([1], "item 0 is int"), (None, "got NoneType")])
def test_bad_input(bad, message, checkpoints):
    path, _ = checkpoints("bert", "feature-extraction")
    with pytest.raises(InputError, match=message):
        Tokenizer.from_dir(path)(bad)
    with pytest.raises(InputError, match="2 texts but 1 text pairs"):
        Tokenizer.from_dir(path)(["a", "b"], ["c"])


def test_truncation_copies_are_capped(checkpoints):
    from kiln.runtime import tokenizer as module

    path, _ = checkpoints("bert", "feature-extraction")
    tok = Tokenizer.from_dir(path)
    text = "paris london " * 40
    # callers pick the truncation (question answering's max_seq_len and doc_stride): one copy each, but not forever
    for m in range(8, 40):
        assert tok([text], max_length=m).input_ids.shape == (1, m)
    assert len(tok._variants) == module._MAX_VARIANTS and tok._base_key in tok._variants
    assert tok([text]).input_ids.shape == (1, 64) and tok([text], max_length=8).input_ids.shape == (1, 8)
