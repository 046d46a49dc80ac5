"""Adding tokens (issue: the seed's promises): kiln's tokenizer adds them as transformers' does, every family's torch
reference resizes its token tables as transformers' resize_token_embeddings does (old rows kept, new rows at the old
rows' mean, a tied head still tied), the saved checkpoint loads in transformers and the JAX/TF siblings with the same
outputs, and an export carries the tokens and the rows into the artifact, whose pipeline reads a new token as one id."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import kiln
from conftest import TINY_LLAMA, make_causal_lm
from kiln.errors import ConfigError, InputError
from kiln.runtime.tokenizer import Tokenizer

NEW = ["<kiln>", "paris-sur-mer"]


def resize_both(ours, theirs, n):
    ours.resize_token_embeddings(n)
    theirs.resize_token_embeddings(n)


def test_tokenizer_adds_tokens_as_transformers(checkpoints, tmp_path):
    path, _ = checkpoints("bert", "fill-mask")
    ours = Tokenizer.from_dir(path)
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    before = len(ours)
    assert before == len(theirs)
    assert ours.add_tokens(NEW) == 2 and theirs.add_tokens(NEW) == 2
    assert ours.add_tokens(["<sep2>"], special=True) == 1 and theirs.add_tokens(["<sep2>"], special_tokens=True) == 1
    assert len(ours) == len(theirs) == before + 3
    text = "hello <kiln> paris-sur-mer <sep2> world"
    batch = ours([text])
    assert batch.input_ids[0].tolist() == theirs(text)["input_ids"]
    assert ours.decode(batch.input_ids[0]) == theirs.decode(theirs(text)["input_ids"], skip_special_tokens=True)
    ours.save_pretrained(tmp_path / "saved")
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert reloaded(text)["input_ids"] == theirs(text)["input_ids"] and len(reloaded) == len(theirs)
    assert Tokenizer.from_dir(tmp_path / "saved")([text]).input_ids[0].tolist() == theirs(text)["input_ids"]


@pytest.mark.parametrize("tokens, message", [(["[MASK]"], r"Already in the vocabulary: '\[MASK\]' \(id 4\)"),
                                             ([], "non-empty string"), (["a", "a"], "same token twice"),
                                             ([""], "non-empty string"), (3, "non-empty string")])
def test_bad_tokens(checkpoints, tokens, message):
    tokenizer = Tokenizer.from_dir(checkpoints("bert", "fill-mask")[0])
    with pytest.raises(InputError, match=message):
        tokenizer.add_tokens(tokens)
    assert len(tokenizer) == len(Tokenizer.from_dir(checkpoints("bert", "fill-mask")[0]))


def check_resized(ours, theirs, old: int, new: int, names):
    """Old rows equal; new rows at the old rows' mean (both implementations add 1e-9 of the covariance)."""
    state = dict(ours.named_parameters())
    for ours_name, their_weight in names:
        got, want = state[ours_name].detach(), their_weight.detach()
        assert got.shape[0] == want.shape[0] == new
        torch.testing.assert_close(got[:old], want[:old])
        torch.testing.assert_close(got[old:], want[old:], atol=1e-4, rtol=0)
        torch.testing.assert_close(got[old:], got[:old].mean(0).expand_as(got[old:]), atol=1e-4, rtol=0)


def test_bert_masked_lm(checkpoints, tmp_path):
    path, theirs = checkpoints("bert", "fill-mask")
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(path).eval()
    ours = kiln.from_pretrained(path, task="fill-mask")
    old = ours.config.vocab_size
    resize_both(ours, theirs, old + 2)
    assert ours.config.vocab_size == old + 2
    check_resized(ours, theirs, old, old + 2, [("bert.embeddings.word.weight",
                                                theirs.bert.embeddings.word_embeddings.weight)])
    bias = ours.lm_head.bias.detach()  # the tied decoder's bias: padded with zeros, as transformers does
    torch.testing.assert_close(bias, theirs.cls.predictions.bias.detach())
    assert bias[old:].abs().max() == 0
    ids = torch.tensor([[2, 10, old, 11, old + 1, 3]])
    with torch.no_grad():
        logits = ours(input_ids=ids)["logits"]
    assert logits.shape[-1] == old + 2
    ours.save_pretrained(tmp_path / "saved")
    reloaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_llama_head_resized_or_kept_tied(tmp_path, tie):
    theirs = make_causal_lm(tmp_path / "ckpt", "llama", **{**TINY_LLAMA, "tie_word_embeddings": tie})
    ours = kiln.from_pretrained(tmp_path / "ckpt", task="text-generation")
    resize_both(ours, theirs, 103)
    names = [("embed.weight", theirs.model.embed_tokens.weight)]
    if not tie:
        names.append(("lm_head.weight", theirs.lm_head.weight))
    check_resized(ours, theirs, 100, 103, names)
    assert (ours.lm_head is None) == tie
    ours.save_pretrained(tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.tensor([[5, 101, 7, 102]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ours(ids)["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("framework", ["jax", "tf"])
def test_siblings_load_a_resized_checkpoint(tmp_path, framework):
    pytest.importorskip({"jax": "flax", "tf": "tensorflow"}[framework])
    make_causal_lm(tmp_path / "ckpt", "llama", **TINY_LLAMA)
    ours = kiln.from_pretrained(tmp_path / "ckpt", task="text-generation")
    ours.resize_token_embeddings(104)
    ours.save_pretrained(tmp_path / "saved")
    sibling = kiln.from_pretrained(tmp_path / "saved", task="text-generation", framework=framework)
    ids = np.array([[5, 101, 7, 103]])
    with torch.no_grad():
        want = ours(torch.from_numpy(ids))["logits"].numpy()
    got = np.asarray(sibling(input_ids=ids)["logits"])
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_gpt2_tied_head_follows_the_embedding(tmp_path):
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=100)
    torch.manual_seed(0)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    theirs.save_pretrained(tmp_path / "gpt2")
    ours = kiln.from_pretrained(tmp_path / "gpt2", task="text-generation")
    resize_both(ours, theirs, 102)
    check_resized(ours, theirs, 100, 102, [("embed.weight", theirs.transformer.wte.weight)])
    assert theirs.lm_head.weight is theirs.transformer.wte.weight  # transformers' head is still tied, as ours is
    ids = torch.tensor([[3, 100, 101]])
    with torch.no_grad():
        logits = ours(ids)["logits"]
    assert logits.shape[-1] == 102 and ours.lm_head is None
    ours.save_pretrained(tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, atol=1e-5, rtol=0)


def test_models_without_tokens_say_so(vit_checkpoints):
    path, _ = vit_checkpoints("image-classification")
    with pytest.raises(ConfigError, match="has no token embeddings to resize"):
        kiln.from_pretrained(path, task="image-classification").resize_token_embeddings(10)


def test_added_tokens_reach_the_artifact(checkpoints, tmp_path):
    """The prepared checkpoint exports, the artifact's tokenizer reads a new token as one id, and the graph's logits
    cover the new rows; a tokenizer larger than the model is refused before anything is traced."""
    path, _ = checkpoints("bert", "fill-mask")
    tokenizer = Tokenizer.from_dir(path)
    tokenizer.add_tokens(NEW)
    prepared = tmp_path / "prepared"
    tokenizer.save_pretrained(prepared)
    model = kiln.from_pretrained(path, task="fill-mask")
    with pytest.raises(InputError, match=r"The tokenizer has \d+ tokens but the model's embedding has \d+ rows"):
        model.save_pretrained(prepared)  # not resized yet
        kiln.export(str(prepared), tmp_path / "refused", task="fill-mask", batch="1:4", seq="1:32")
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(prepared)
    manifest = kiln.export(str(prepared), tmp_path / "artifact", task="fill-mask", batch="1:4", seq="1:32")
    assert manifest["validation"]["passed"]
    assert manifest["outputs"][0]["shape"][-1] == len(tokenizer)
    pipe = kiln.pipeline("fill-mask", tmp_path / "artifact")
    ids = pipe.tokenizer(["hello <kiln> [MASK]"]).input_ids[0].tolist()
    assert tokenizer.token_to_id("<kiln>") in ids and len(ids) == 5  # [CLS] hello <kiln> [MASK] [SEP]
    assert json.loads((tmp_path / "artifact" / "config.json").read_text())["vocab_size"] == len(tokenizer)
    assert pipe("hello <kiln> [MASK]", top_k=2)[0]["token"] < len(tokenizer)
