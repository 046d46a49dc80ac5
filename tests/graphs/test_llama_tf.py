"""The keras (TensorFlow) LLaMA-family sibling against the PyTorch reference on tiny random configs that exercise each
flag (GQA, RoPE scaling, biases, head_dim, tied and untied heads, sliding window), with the KV cache, and its
save_pretrained back to transformers."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("the TensorFlow reference needs tensorflow: pip install 'kiln[tf]'", allow_module_level=True)

# Before anything else imports TensorFlow: kiln's TensorFlow modules load triton first (kiln/graphs/bert/model_tf.py).
from kiln.graphs.llama import model_tf  # noqa: E402, I001

import torch  # noqa: E402

from conftest import make_causal_lm  # noqa: E402
from kiln.graphs.checkpoint import from_pretrained  # noqa: E402

ATOL = 1e-4
SIZES = dict(vocab_size=97, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
VARIANTS = {
    "llama-gqa": ("llama", dict(num_key_value_heads=2)),
    "llama-linear-rope": ("llama", dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama3-rope": ("llama", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama-bias-head_dim-tied": ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=16,
                                               tie_word_embeddings=True)),
    "llama-mqa-untied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=False)),
    "qwen2-bias": ("qwen2", dict(num_key_value_heads=2)),
    "mistral-sliding-window": ("mistral", dict(num_key_value_heads=2, sliding_window=4)),
    "qwen3-qk-norm": ("qwen3", dict(num_key_value_heads=2, head_dim=16)),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (checkpoint path, transformers model, torch reference, TensorFlow reference), built once."""
    made = {}

    def get(name):
        if name not in made:
            model_type, flags = VARIANTS[name]
            path = tmp_path_factory.mktemp(name)
            theirs = make_causal_lm(path, model_type, **SIZES, **flags)
            made[name] = (path, theirs, from_pretrained(path, "text-generation"),
                          from_pretrained(path, "text-generation", framework="tf"))
        return made[name]

    return get


def left_padded(seed: int = 0):
    """(ids, mask, position_ids) for 3 rows of 10 tokens, rows 1 and 2 left-padded as batched generation pads."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 97, size=(3, 10))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids[mask == 0] = 2
    return ids, mask, np.clip(mask.cumsum(-1) - 1, 0, None)


def torch_run(model, *arrays, past=None, **flags):
    with torch.no_grad():
        past = [tuple(torch.from_numpy(x) for x in pair) for pair in past] if past is not None else None
        return model(*(torch.from_numpy(a) for a in arrays), past_key_values=past, **flags)


def numpy_presents(out) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.asarray(k), np.asarray(v)) for k, v in out["present_key_values"]]  # tf or torch tensors


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_hidden_states_attentions_and_cache_match_torch(name, models):
    _, _, theirs, ours = models(name)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in theirs.state_dict().items()]
    assert (ours.lm_head is None) == ours.config.tie_word_embeddings
    ids, mask, pos = left_padded()
    got = ours(ids, mask, pos, output_hidden_states=True, output_attentions=True)
    want = torch_run(theirs, ids, mask, pos, output_hidden_states=True, output_attentions=True)
    assert list(got) == list(want)
    valid = mask.astype(bool)  # padded query positions have no defined output
    for key in ("hidden_states", "attentions"):
        for i, (a, b) in enumerate(zip(got[key], want[key], strict=True)):
            a, b = np.asarray(a), b.numpy()
            a, b = (a.swapaxes(1, 2)[valid], b.swapaxes(1, 2)[valid]) if key == "attentions" else (a[valid], b[valid])
            np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=f"{name} {key}[{i}]")
    np.testing.assert_allclose(np.asarray(got["logits"])[valid], want["logits"].numpy()[valid], atol=ATOL, rtol=0)
    for (k, v), (tk, tv) in zip(numpy_presents(got), want["present_key_values"], strict=True):
        np.testing.assert_allclose(k, tk.numpy(), atol=ATOL, rtol=0)  # (B, Hkv, S, D): every position is defined
        np.testing.assert_allclose(v, tv.numpy(), atol=ATOL, rtol=0)

    # Prefill the first 9 tokens, then decode the last one over the cache: the same as the full forward, and the same
    # as torch's decode step from torch's own cache.
    prefix = ours(ids[:, :9], mask[:, :9], pos[:, :9])
    step = ours(ids[:, 9:], mask, pos[:, 9:], past_key_values=numpy_presents(prefix))
    torch_prefix = torch_run(theirs, ids[:, :9], mask[:, :9], pos[:, :9])
    torch_step = torch_run(theirs, ids[:, 9:], mask, pos[:, 9:], past=numpy_presents(torch_prefix))
    np.testing.assert_allclose(np.asarray(step["logits"])[:, 0], np.asarray(got["logits"])[:, 9], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(step["logits"]), torch_step["logits"].numpy(), atol=ATOL, rtol=0)
    assert np.asarray(step["present_key_values"][0][0]).shape == (3, ours.config.num_key_value_heads, 10, ours.config.head_dim)


def test_defaults_continue_positions_from_the_cache(models):
    """Without attention_mask and position_ids, positions continue after the cache, as in the torch reference."""
    _, _, theirs, ours = models("llama3-rope")
    ids, _, _ = left_padded(seed=1)
    got = ours(ids[:, :6])
    step = ours(ids[:, 6:], past_key_values=numpy_presents(got))
    want = torch_run(theirs, ids)["logits"].numpy()
    np.testing.assert_allclose(np.asarray(got["logits"]), want[:, :6], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(step["logits"]), want[:, 6:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("T", [10, 3, 1])
@pytest.mark.parametrize("window", [None, 4])
def test_decoder_mask_equals_torch(T, window):
    """Bottom-right causal over a cache (S = 10 keys, T queries), padding, the window, and rows with nothing to
    attend to (left padding) attending to everything instead."""
    from kiln.graphs.llama import model_torch

    _, mask, _ = left_padded()
    got = np.asarray(model_tf.decoder_mask(mask, T, window))
    want = model_torch.decoder_mask(torch.from_numpy(mask), T, window).numpy()
    assert got.shape == want.shape == (3, 1, T, 10)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["llama-bias-head_dim-tied", "qwen2-bias"])
def test_save_pretrained_loads_back_in_transformers(name, models, tmp_path):
    _, theirs, _, ours = models(name)
    ours.save_pretrained(tmp_path)
    back = type(theirs).from_pretrained(tmp_path).eval()
    ids, mask, pos = left_padded(seed=2)
    valid = mask.astype(bool)
    with torch.no_grad():
        want = back(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids, mask, pos)["logits"])[valid], want[valid], atol=ATOL, rtol=0)
