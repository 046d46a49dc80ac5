"""The LLaMA family's flax nnx reference vs the PyTorch one on tiny random configs that exercise each flag: logits,
hidden states, attentions and the KV cache (a prefill, then one token with the past), and save_pretrained output that
transformers loads back."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flax", reason="pip install 'kiln[jax]' for the JAX references")
import torch  # noqa: E402
import transformers  # noqa: E402

from conftest import make_causal_lm  # noqa: E402
from kiln.graphs.checkpoint import from_pretrained  # noqa: E402

SIZES = dict(vocab_size=97, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
VARIANTS = {
    "llama-gqa-untied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-linear-rope": ("llama", dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama3-rope": ("llama", dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama-bias-head_dim-tied": ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=16,
                                               tie_word_embeddings=True)),
    "qwen2-mqa-bias": ("qwen2", dict(num_key_value_heads=1)),
    "mistral-sliding-window": ("mistral", dict(num_key_value_heads=2, sliding_window=4)),
    "qwen3-qk-norm": ("qwen3", dict(num_key_value_heads=2, head_dim=16)),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            model_type, flags = VARIANTS[name]
            made[name] = tmp_path_factory.mktemp(name)
            make_causal_lm(made[name], model_type, **SIZES, **flags)
        return made[name]

    return get


def left_padded(seed: int = 0):
    """(ids, mask, position_ids) as batched generation pads: on the left, positions counting real tokens only."""
    rng = np.random.default_rng(seed)
    mask = np.ones((3, 10), np.int64)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids = np.where(mask == 1, rng.integers(3, 97, size=mask.shape), 2).astype(np.int64)
    return ids, mask, np.clip(mask.cumsum(-1) - 1, 0, None)


def torch_run(model, ids, mask, pos, past=None, **flags):
    args = [torch.from_numpy(x) for x in (ids, mask, pos)]
    past = None if past is None else [tuple(torch.from_numpy(np.array(t)) for t in pair) for pair in past]
    with torch.no_grad():
        return model(*args, past_key_values=past, **flags)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_outputs_and_cache_match_torch(name, checkpoint):
    path = checkpoint(name)
    ours, theirs = from_pretrained(path, "text-generation", framework="jax"), from_pretrained(path, "text-generation")
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == shapes
    assert (ours.lm_head is None) == ours.config.tie_word_embeddings
    ids, mask, pos = left_padded()
    # Both references give padded queries the same defined output (they attend to every key), so compare all rows.
    a = ours(ids, mask, pos, output_hidden_states=True, output_attentions=True)
    b = torch_run(theirs, ids, mask, pos, output_hidden_states=True, output_attentions=True)
    np.testing.assert_allclose(np.asarray(a["logits"]), b["logits"].numpy(), atol=1e-4, rtol=0)
    for x, y in zip(a["hidden_states"], b["hidden_states"], strict=True):
        np.testing.assert_allclose(np.asarray(x), y.numpy(), atol=1e-4, rtol=0)
    for x, y in zip(a["attentions"], b["attentions"], strict=True):  # (B, H, T, S)
        np.testing.assert_allclose(np.asarray(x), y.numpy(), atol=1e-5, rtol=0)
    for x, y in zip(a["present_key_values"], b["present_key_values"], strict=True):  # (B, Hkv, S, D)
        np.testing.assert_allclose(np.asarray(x[0]), y[0].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(x[1]), y[1].numpy(), atol=1e-5, rtol=0)

    # The fused path, then the cache: a prefill of 9 tokens and one step with its past equal the full forward.
    full = ours(ids, mask, pos)
    np.testing.assert_allclose(np.asarray(full["logits"]), b["logits"].numpy(), atol=1e-4, rtol=0)
    prefill = ours(ids[:, :9], mask[:, :9], pos[:, :9])
    step = ours(ids[:, 9:], mask, pos[:, 9:], past_key_values=prefill["present_key_values"])
    torch_step = torch_run(theirs, ids[:, 9:], mask, pos[:, 9:], past=prefill["present_key_values"])
    assert step["present_key_values"][0][0].shape == (3, ours.config.num_key_value_heads, 10, ours.config.head_dim)
    np.testing.assert_allclose(np.asarray(step["logits"]), torch_step["logits"].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(step["logits"][:, 0]), np.asarray(full["logits"][:, -1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama-gqa-untied", "llama-bias-head_dim-tied"])
def test_save_pretrained_loads_back_in_transformers(name, checkpoint, tmp_path):
    ours = from_pretrained(checkpoint(name), "text-generation", framework="jax")
    ours.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask, pos = left_padded(seed=1)
    valid = mask.astype(bool)
    with torch.no_grad():
        got = back(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   position_ids=torch.from_numpy(pos)).logits.numpy()
    np.testing.assert_allclose(got[valid], np.asarray(ours(ids, mask, pos)["logits"])[valid], atol=1e-4, rtol=0)
