"""Every head of the BERT family (BERT, RoBERTa, XLM-RoBERTa, DistilBERT) vs transformers, and its round trip."""

from __future__ import annotations

import pytest
import torch
import transformers

import kiln

FAMILIES = ["bert", "roberta", "xlm-roberta", "distilbert"]
TASKS = ["feature-extraction", "text-classification", "token-classification", "question-answering", "fill-mask"]


def inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = config.pad_token_id  # as a tokenizer pads; RoBERTa's position ids depend on it
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", TASKS)
def test_head_matches_transformers_and_round_trips(family, task, checkpoints, tmp_path):
    path, theirs = checkpoints(family, task)
    ours = kiln.from_pretrained(str(path), task=task)
    ids, mask = inputs(theirs.config)
    with torch.no_grad():
        a = ours(ids, mask)
        b = theirs(input_ids=ids, attention_mask=mask)
    assert set(a) == {k for k in b.keys() if k in a} and a
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], atol=1e-5, rtol=0, msg=f"{family} {task} {name}")
        assert value.std() > 0  # the outputs depend on the input, not a constant

    ours.save_pretrained(tmp_path / "saved")
    back = type(theirs).from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        c = back(input_ids=ids, attention_mask=mask)
    for name, value in a.items():
        torch.testing.assert_close(value, c[name], atol=1e-6, rtol=0)


def test_masked_lm_decoder_is_tied_to_the_word_embeddings(checkpoints):
    path, _ = checkpoints("bert", "fill-mask")
    model = kiln.from_pretrained(str(path), task="fill-mask")
    with torch.no_grad():
        model.bert.embeddings.word.weight[7].zero_()
        logits = model(*inputs(model.config))["logits"]
    torch.testing.assert_close(logits[..., 7], model.lm_head.bias[7].expand_as(logits[..., 7]))


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_hidden_states_and_attentions(family, checkpoints):
    path, theirs = checkpoints(family, "token-classification")
    theirs_eager = type(theirs).from_pretrained(path, attn_implementation="eager").eval()
    ours = kiln.from_pretrained(str(path), task="token-classification")
    ids, mask = inputs(theirs.config, seed=1)
    with torch.no_grad():
        a = ours(ids, mask, output_hidden_states=True, output_attentions=True)
        b = theirs_eager(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert len(a["hidden_states"]) == 3 and len(a["attentions"]) == 2
    for x, y in zip(a["hidden_states"] + a["attentions"], b.hidden_states + b.attentions):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_distilbert_config_names_are_mapped(checkpoints):
    path, theirs = checkpoints("distilbert", "feature-extraction")
    config = kiln.from_pretrained(str(path)).config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (
        theirs.config.dim, theirs.config.n_layers, theirs.config.n_heads, theirs.config.hidden_dim)
    assert config.type_vocab_size == 0


def test_xlm_roberta_saves_as_xlm_roberta(checkpoints, tmp_path):
    path, _ = checkpoints("xlm-roberta", "text-classification")
    kiln.from_pretrained(str(path), task="text-classification").save_pretrained(tmp_path)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "XLMRobertaForSequenceClassification"
