"""The BERT family's flax nnx reference vs the PyTorch one: same parameter names and shapes, same outputs (padded
batches, hidden states, attentions) for every family and task, on tiny random weights and on all-MiniLM-L6-v2, and
save_pretrained output that torch and transformers load back."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flax", reason="pip install 'kiln[jax]' for the JAX references")
import torch  # noqa: E402

from kiln.graphs.checkpoint import from_pretrained  # noqa: E402

FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert")
TASKS = ("feature-extraction", "text-classification", "token-classification", "question-answering", "fill-mask")


def padded_batch(vocab_size: int, pad_token_id: int, seed: int = 0):
    """(ids, mask): three rows of 11 tokens, two of them right-padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(pad_token_id + 1, vocab_size, size=(3, 11))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    return np.where(mask == 1, ids, pad_token_id).astype(np.int64), mask.astype(np.int64)


def run_both(path, task, ids, mask, **flags):
    """(jax outputs, torch outputs) as NumPy, same keys; tuples stay tuples."""
    ours = from_pretrained(path, task, framework="jax")(ids, mask, **flags)
    with torch.no_grad():
        theirs = from_pretrained(path, task)(torch.from_numpy(ids), torch.from_numpy(mask), **flags)
    return to_numpy(ours), to_numpy(theirs)


def to_numpy(out: dict) -> dict:
    return {k: tuple(np.asarray(x) for x in v) if isinstance(v, tuple) else np.asarray(v) for k, v in out.items()}


def assert_outputs_close(ours: dict, theirs: dict, atol: float):
    assert list(ours) == list(theirs)
    for key, want in theirs.items():
        got = ours[key]
        if isinstance(want, tuple):
            assert len(got) == len(want), key
            for i, (a, b) in enumerate(zip(got, want)):
                np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=f"{key}[{i}]")
        else:
            np.testing.assert_allclose(got, want, atol=atol, rtol=0, err_msg=key)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", TASKS)
def test_outputs_match_torch(family, task, checkpoints):
    path, _ = checkpoints(family, task)
    jax_model = from_pretrained(path, task, framework="jax")
    torch_state = from_pretrained(path, task).state_dict()
    state = jax_model.state_dict()
    assert sorted(state) == sorted(torch_state)
    assert {k: v.shape for k, v in state.items()} == {k: tuple(v.shape) for k, v in torch_state.items()}
    assert jax_model.task == task
    if task == "feature-extraction":  # transformers' base models have a pooler, except DistilBERT's
        assert (jax_model.pooler is not None) == (family != "distilbert")

    ids, mask = padded_batch(jax_model.config.vocab_size, jax_model.config.pad_token_id)
    ours, theirs = run_both(path, task, ids, mask, output_hidden_states=True, output_attentions=True)
    assert len(ours["hidden_states"]) == 3 and ours["attentions"][0].shape == (3, 4, 11, 11)
    assert_outputs_close(ours, theirs, atol=1e-5)
    # The fused path (what exports as one Attention node) gives the same main outputs.
    fused, _ = run_both(path, task, ids, mask)
    main = {k: v for k, v in theirs.items() if k not in ("hidden_states", "attentions")}
    assert_outputs_close(fused, main, atol=1e-5)


def test_eager_attention_equals_fused(checkpoints):
    path, _ = checkpoints("bert", "feature-extraction")
    ids, mask = padded_batch(100, 0, seed=3)
    fused = from_pretrained(path, framework="jax")(ids, mask)
    eager = from_pretrained(path, framework="jax", attn_impl="eager")(ids, mask)
    np.testing.assert_allclose(eager["last_hidden_state"], fused["last_hidden_state"], atol=1e-6)
    with pytest.raises(ValueError, match="Unknown attention implementation"):
        from_pretrained(path, framework="jax", attn_impl="flash")(ids, mask)


def test_real_minilm_weights_match_torch(minilm_dir):
    ids, mask = padded_batch(30522, 0, seed=1)
    ids[:, 0] = 101  # [CLS]
    ours, theirs = run_both(minilm_dir, "feature-extraction", ids, mask, output_hidden_states=True)
    assert ours["last_hidden_state"].shape == (3, 11, 384)
    assert_outputs_close(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("family, task", [("bert", "text-classification"), ("roberta", "fill-mask"),
                                          ("distilbert", "question-answering")])
def test_save_pretrained_loads_back_in_torch_and_transformers(family, task, checkpoints, tmp_path):
    import transformers

    from conftest import AUTO_CLASSES

    path, _ = checkpoints(family, task)
    ours = from_pretrained(path, task, framework="jax")
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ids, mask = padded_batch(ours.config.vocab_size, ours.config.pad_token_id, seed=2)
    want = {k: np.asarray(v) for k, v in ours(ids, mask).items()}
    back = from_pretrained(tmp_path, task)  # the torch reference
    theirs = getattr(transformers, AUTO_CLASSES[task]).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = back(torch.from_numpy(ids), torch.from_numpy(mask))
        hf = theirs(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    for key, value in want.items():
        np.testing.assert_allclose(got[key].numpy(), value, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(hf[key].numpy(), value, atol=1e-5, err_msg=key)
