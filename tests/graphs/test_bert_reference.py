"""The kiln PyTorch reference (BERT family) against transformers, the oracle, and kiln's attention against the NumPy spec."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kiln
from kiln.graphs import attention as graphs_attention
from kiln.graphs.checkpoint import from_pretrained
from kiln.kernels.attention.reference import attention as reference_attention

ATOL = 1e-5
MODELS = [(m, t) for m in ("bert", "roberta") for t in ("feature-extraction", "text-classification")]
HEADS = {"feature-extraction": ("last_hidden_state", "pooler_output"), "text-classification": ("logits",)}


def make_batch(config, model_type: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A padded batch as a tokenizer makes it: rows of different lengths, pad_token_id where attention_mask is 0."""
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 6, 3]
    ids = torch.randint(5, config.vocab_size, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    ids[mask == 0] = config.pad_token_id
    batch = {"input_ids": ids, "attention_mask": mask}
    if model_type == "bert":  # second segment in the tail of each row
        batch["token_type_ids"] = (torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None] // 2).long() * mask
    return batch


def hf_eager(path, task):
    """transformers returns attentions only from its eager implementation."""
    import transformers

    cls = transformers.AutoModel if task == "feature-extraction" else transformers.AutoModelForSequenceClassification
    return cls.from_pretrained(path, attn_implementation="eager").eval()


def assert_close(got, want, what: str, atol: float = ATOL) -> None:
    if isinstance(want, (tuple, list)):
        assert isinstance(got, tuple) and len(got) == len(want), f"{what}: {len(got)} items, expected {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{what}[{i}]", atol)
        return
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    diff = (got - want).abs().max().item()
    assert diff <= atol, f"{what}: max |kiln - transformers| = {diff:.3g} > {atol}"


@pytest.fixture(scope="module")
def hf_models(checkpoints):
    cache = {}

    def get(model_type, task):
        if (model_type, task) not in cache:
            path, _ = checkpoints(model_type, task)
            cache[(model_type, task)] = hf_eager(path, task)
        return cache[(model_type, task)]

    return get


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type,task", MODELS)
def test_matches_transformers(checkpoints, hf_models, model_type, task, attn_impl):
    path, _ = checkpoints(model_type, task)
    hf = hf_models(model_type, task)
    model = from_pretrained(path, task=task, attn_impl=attn_impl)
    assert model.task == task and not model.training
    batch = make_batch(hf.config, model_type)
    with torch.no_grad():
        want = hf(**batch, output_hidden_states=True, output_attentions=True)
        got = model(**batch, output_hidden_states=True, output_attentions=True)
    assert set(got) == {*HEADS[task], "hidden_states", "attentions"}
    for key in got:
        assert_close(got[key], want[key], f"{model_type}/{task}/{attn_impl} {key}")
    assert len(got["hidden_states"]) == hf.config.num_hidden_layers + 1
    # Padded keys get exactly zero probability.
    assert (got["attentions"][0][2, :, :, 3:] == 0).all()


@pytest.mark.parametrize("model_type,task", MODELS)
def test_eager_and_sdpa_agree(checkpoints, model_type, task):
    path, hf = checkpoints(model_type, task)
    eager = kiln.from_pretrained(str(path), task=task, attn_impl="eager")
    sdpa = kiln.from_pretrained(str(path), task=task, attn_impl="sdpa")
    batch = make_batch(hf.config, model_type, seed=1)
    with torch.no_grad():
        a = eager(**batch, output_hidden_states=True, output_attentions=True)
        b = sdpa(**batch, output_hidden_states=True, output_attentions=True)
        plain = sdpa(**batch)
    assert set(a) == set(b)
    for key in a:
        assert_close(b[key], a[key], f"sdpa vs eager {key}")
    assert set(plain) == set(HEADS[task]), "hidden states and attentions only on request"
    for key in plain:
        assert_close(plain[key], a[key], f"plain {key}")


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_default_inputs(checkpoints, model_type):
    """No attention_mask and no token_type_ids: both sides default to all-ones and all-zeros."""
    path, hf = checkpoints(model_type, "feature-extraction")
    model = from_pretrained(path)
    ids = make_batch(hf.config, model_type)["input_ids"][:1]
    with torch.no_grad():
        assert_close(model(ids)["last_hidden_state"], hf(input_ids=ids).last_hidden_state, "no mask")


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_encoder_from_classification_checkpoint(checkpoints, model_type):
    """feature-extraction over a task checkpoint reads the nested encoder ("bert." / "roberta.")."""
    path, hf = checkpoints(model_type, "text-classification")
    model = from_pretrained(path, task="feature-extraction")
    batch = make_batch(hf.config, model_type)
    with torch.no_grad():
        want = getattr(hf, model_type)(**batch).last_hidden_state
        assert_close(model(**batch)["last_hidden_state"], want, "encoder")


@pytest.mark.parametrize("kind", ["multi_label", "regression", "regression_num_labels_only"])
def test_problem_types(tmp_path, kind):
    from conftest import make_checkpoint

    if kind == "multi_label":
        overrides, num_labels = dict(problem_type="multi_label_classification"), 3
    else:  # transformers 5 lets num_labels override an id2label of another length (with a warning): drop it
        overrides, num_labels = dict(problem_type="regression", num_labels=1, id2label=None, label2id=None), 1
    path, _ = make_checkpoint(tmp_path, "bert", "text-classification", **overrides)
    if kind == "regression_num_labels_only":  # a hand-written config: num_labels, no id2label
        raw = json.loads((path / "config.json").read_text())
        raw = {k: v for k, v in raw.items() if k not in ("id2label", "label2id")} | {"num_labels": 1}
        (path / "config.json").write_text(json.dumps(raw))
    hf = hf_eager(path, "text-classification")
    model = from_pretrained(path, task="text-classification")
    assert model.config.problem_type == overrides["problem_type"]
    assert model.config.num_labels == hf.config.num_labels == num_labels
    batch = make_batch(hf.config, "bert")
    with torch.no_grad():
        got, want = model(**batch)["logits"], hf(**batch).logits
    assert got.shape == (3, num_labels)
    assert_close(got, want, f"{kind} logits")


def test_minilm_real_weights(minilm_dir):
    import transformers

    hf = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    model = from_pretrained(minilm_dir)
    batch = make_batch(hf.config, "bert", seed=2)
    with torch.no_grad():
        got, want = model(**batch), hf(**batch)
    assert_close(got["last_hidden_state"], want.last_hidden_state, "MiniLM last_hidden_state", atol=1e-4)


# --- graphs.attention against the NumPy spec -------------------------------------------------------------------


def qkv(B, H, Hkv, T, S, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, S, D, generator=g),
            torch.randn(B, Hkv, S, D, generator=g))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attention_padding_mask_matches_spec(impl):
    q, k, v = qkv(B=3, H=4, Hkv=4, T=6, S=6, D=8)
    padding = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5])  # (B, S), no row fully masked
    mask = padding[:, None, None, :].bool().expand(3, 1, 6, 6)  # as BertModel builds it
    want = reference_attention(q.numpy(), k.numpy(), v.numpy(), mask=padding.numpy(), return_probs=True)
    out, probs = graphs_attention.attention(q, k, v, mask=mask, impl=impl)
    assert probs is None
    np.testing.assert_allclose(out.numpy(), want.out, atol=ATOL)
    out, probs = graphs_attention.attention(q, k, v, mask=mask, impl=impl, return_probs=True)
    np.testing.assert_allclose(out.numpy(), want.out, atol=ATOL)
    np.testing.assert_allclose(probs.numpy(), want.probs, atol=ATOL)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("T,S", [(5, 5), (3, 7), (1, 4)], ids=["square", "kv-cache", "one-query"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["causal", "causal+padding"])
def test_attention_gqa_causal_matches_spec(impl, T, S, with_mask):
    """Causality is bottom-right aligned in both impls (torch's own is_causal is top-left)."""
    q, k, v = qkv(B=2, H=6, Hkv=2, T=T, S=S, D=8, seed=T * 10 + S)
    padding = torch.ones(2, S, dtype=torch.long)
    padding[1, -1] = 0  # a padded key that only the last query could see: no query row is fully masked
    mask = padding[:, None, None, :].bool() if with_mask else None
    want = reference_attention(q.numpy(), k.numpy(), v.numpy(), causal=True, scale=0.3,
                               mask=padding.numpy() if with_mask else None)
    out, _ = graphs_attention.attention(q, k, v, mask=mask, causal=True, scale=0.3, impl=impl)
    np.testing.assert_allclose(out.numpy(), want.out, atol=ATOL)


def test_attention_unknown_impl():
    q, k, v = qkv(1, 2, 2, 3, 3, 4)
    with pytest.raises(ValueError, match="flash"):
        graphs_attention.attention(q, k, v, impl="flash")
