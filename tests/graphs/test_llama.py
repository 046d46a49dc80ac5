"""LLaMA-family reference vs transformers on tiny random configs that exercise each flag, with the KV cache."""

from __future__ import annotations

import pytest
import torch
import transformers

import kiln
from conftest import make_causal_lm
from kiln.errors import ConfigError

SIZES = dict(vocab_size=97, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
VARIANTS = {
    "llama-gqa": ("llama", dict(num_key_value_heads=2)),
    "llama-mqa-theta": ("llama", dict(num_key_value_heads=1, rope_theta=500000.0)),
    "llama-linear-rope": ("llama", dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama3-rope": ("llama", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama-bias-head_dim-tied": ("llama", dict(attention_bias=True, head_dim=16, tie_word_embeddings=True)),
    "llama-untied": ("llama", dict(tie_word_embeddings=False)),
    "qwen2-bias": ("qwen2", dict(num_key_value_heads=2)),
    "mistral-sliding-window": ("mistral", dict(num_key_value_heads=2, sliding_window=4)),
    "qwen3-qk-norm": ("qwen3", dict(num_key_value_heads=2, head_dim=16)),
    "qwen3-sliding-every-layer": ("qwen3", dict(num_key_value_heads=2, head_dim=8, use_sliding_window=True,
                                                sliding_window=4, max_window_layers=0)),
    "phi3-fused": ("phi3", dict(num_key_value_heads=2)),
    # LongRoPE past an original context of 12: a 10-token prompt prefills with the short factors, generation passes
    # position 12 and switches to the long ones (the cached keys keep theirs, as in transformers)
    "phi3-longrope-window": ("phi3", dict(num_key_value_heads=2, sliding_window=6, original_max_position_embeddings=12,
                                          rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 2.0],
                                                        "long_factor": [1.5, 2.0, 3.0, 5.0]})),
    "phi4-partial-rotary": ("phi3", dict(num_key_value_heads=1, partial_rotary_factor=0.5,
                                         original_max_position_embeddings=12, tie_word_embeddings=True,
                                         rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.2],
                                                       "long_factor": [2.0, 4.0]})),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            model_type, flags = VARIANTS[name]
            path = tmp_path_factory.mktemp(name)
            theirs = make_causal_lm(path, model_type, **SIZES, **flags)
            made[name] = (path, theirs, kiln.from_pretrained(str(path), task="text-generation"))
        return made[name]

    return get


def left_padded(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids[mask == 0] = 2
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_hidden_states_and_cache_match_transformers(name, models):
    _, theirs, ours = models(name)
    ids, mask, pos = left_padded()
    with torch.no_grad():
        a = ours(ids, mask, pos, output_hidden_states=True)
        b = theirs(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        valid = mask.bool()
        torch.testing.assert_close(a["logits"][valid], b.logits[valid], atol=1e-4, rtol=0)
        for x, y in zip(a["hidden_states"], b.hidden_states):
            torch.testing.assert_close(x[valid], y[valid], atol=1e-4, rtol=0)
        # The cache: a prefix, then one token at a time, equals the full forward.
        prefix = ours(ids[:, :6], mask[:, :6], pos[:, :6])
        past, steps = prefix["present_key_values"], []
        for t in range(6, 10):
            out = ours(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], past_key_values=past)
            past = out["present_key_values"]
            steps.append(out["logits"])
        later = valid[:, 6:]  # padded query positions have no defined output
        torch.testing.assert_close(torch.cat(steps, 1)[later], a["logits"][:, 6:][later], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_tokens_match_generate(name, models):
    """A plain greedy loop over the reference and its cache gives transformers.generate's tokens, batched or not."""
    _, theirs, ours = models(name)
    ids, mask, _ = left_padded(seed=1)
    for rows in (slice(0, 1), slice(0, 3)):
        i, m = ids[rows], mask[rows]
        if ours.config.recompute_cache_at:  # LongRoPE: each row as transformers generates it alone (its batches
            # switch every row's factors on the longest row's length; kiln's rows switch on their own)
            expected = torch.stack([theirs.generate(input_ids=r[k.bool()][None], max_new_tokens=8, do_sample=False)[
                0, int(k.sum()):] for r, k in zip(i, m)])
        else:
            expected = theirs.generate(input_ids=i, attention_mask=m, max_new_tokens=8, do_sample=False)[:, i.shape[1]:]
        with torch.no_grad():
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            out = ours(i, m, pos)
            tokens = []
            seq = i
            for _ in range(8):
                nxt = out["logits"][:, -1].argmax(-1, keepdim=True)
                tokens.append(nxt)
                seq = torch.cat([seq, nxt], 1)
                m = torch.cat([m, torch.ones_like(nxt)], 1)
                pos = pos[:, -1:] + 1
                if (m.sum(-1) == (ours.config.recompute_cache_at or -1) + 1).any():  # LongRoPE: as transformers'
                    out = ours(seq, m, (m.cumsum(-1) - 1).clamp(min=0))  # generate, the whole sequence again
                else:
                    out = ours(nxt, m, pos, past_key_values=out["present_key_values"])
        got = torch.cat(tokens, 1)
        for row_got, row_expected in zip(got.tolist(), expected.tolist()):
            end = row_expected.index(1) + 1 if 1 in row_expected else 8  # after EOS (id 1) transformers pads
            assert row_got[:end] == row_expected[:end], name


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias", "llama-bias-head_dim-tied", "qwen3-qk-norm",
                                  "phi3-longrope-window"])
def test_save_pretrained_round_trip(name, models, tmp_path):
    _, theirs, ours = models(name)
    ours.save_pretrained(tmp_path)
    back = type(theirs).from_pretrained(tmp_path).eval()
    for key, value in theirs.state_dict().items():  # Phi-3's fused projections joined back row for row
        assert torch.equal(back.state_dict()[key], value), key
    ids, mask, pos = left_padded()
    valid = mask.bool()
    with torch.no_grad():  # Phi-3 multiplies by the fused matrices: last-bit differences from kiln's split ones
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask, position_ids=pos).logits[valid],
                                   ours(ids, mask, pos)["logits"][valid], atol=1e-5 if "phi" in name else 1e-6, rtol=0)


@pytest.mark.parametrize("change, message", [
    ({"num_key_value_heads": 3}, "multiple of 'num_key_value_heads'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs 'low_freq_factor'"),
    ({"hidden_act": "gelu"}, "'hidden_act' 'gelu' is not supported"),
    ({"num_hidden_layers": 0}, "'num_hidden_layers' must be a positive integer"),
])
def test_bad_configs(change, message):
    from kiln.graphs.llama.config import LlamaConfig

    raw = {"model_type": "llama", **SIZES, **change}
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_dict(raw)


@pytest.mark.parametrize("raw, window", [
    ({}, None),  # use_sliding_window defaults to off: the listed window is not used
    ({"use_sliding_window": True, "sliding_window": 4}, None),  # every layer below max_window_layers (28): full
    ({"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}, 4),
    ({"use_sliding_window": True, "sliding_window": 4, "layer_types": ["sliding_attention"] * 2}, 4),
    ({"sliding_window": 4, "layer_types": ["sliding_attention"] * 2}, None),
])
def test_qwen_windows_read_as_transformers_reads_them(raw, window):
    from kiln.graphs.llama.config import LlamaConfig

    for model_type in ("qwen2", "qwen3"):
        config = {"model_type": model_type, **SIZES, "num_key_value_heads": 2, "head_dim": 8, **raw}
        theirs = transformers.AutoConfig.for_model(**config)
        expected = {theirs.sliding_window if t == "sliding_attention" else None for t in theirs.layer_types}
        assert expected == {window}
        assert LlamaConfig.from_dict(config).sliding_window == window


def test_qwen3_head_dim_defaults_as_transformers():
    from kiln.graphs.llama.config import LlamaConfig

    raw = {"model_type": "qwen3", **SIZES}
    assert LlamaConfig.from_dict(raw).head_dim == transformers.AutoConfig.for_model(**raw).head_dim == 128


@pytest.mark.parametrize("raw, message", [
    ({"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}, "some layers only"),
    ({"use_sliding_window": True, "sliding_window": 4, "layer_types": ["full_attention"]}, "one of full_attention"),
    ({"use_sliding_window": True, "sliding_window": 4, "max_window_layers": "x"}, "'max_window_layers' must be"),
])
def test_qwen_windows_kiln_cannot_apply_are_refused(raw, message):
    from kiln.graphs.llama.config import LlamaConfig

    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_dict({"model_type": "qwen3", **SIZES, "head_dim": 8, **raw})


def test_phi3_reads_fused_projections_and_longrope_as_transformers(models):
    """The fused q/k/v and gate/up rows land in kiln's separate projections; LongRoPE's attention factor is
    transformers' (sqrt(1 + ln(64 / 12) / ln 12))."""
    import math

    _, theirs, ours = models("phi3-longrope-window")
    qkv = theirs.model.layers[1].self_attn.qkv_proj.weight
    assert torch.equal(ours.layers[1].attn.k.weight, qkv[32:48]) and torch.equal(ours.layers[1].attn.v.weight, qkv[48:])
    assert torch.equal(ours.layers[0].mlp.up.weight, theirs.model.layers[0].mlp.gate_up_proj.weight[37:])
    assert ours.config.rope_attention_factor == pytest.approx(math.sqrt(1 + math.log(64 / 12) / math.log(12)))
    _, _, partial = models("phi4-partial-rotary")
    assert partial.config.rotary_dim == 4 and partial.long_inv_freq.shape == (2,)


@pytest.mark.parametrize("rope, message", [
    ({"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 4, "original_max_position_embeddings": 8},
     "short_factor has 3 values.*needs 4"),
    ({"type": "longrope", "short_factor": [1.0] * 4}, "needs 'long_factor'"),
    ({"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0, 1.0, "x", 1.0]}, "list of positive numbers"),
    ({"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4},
     "'original_max_position_embeddings' must be a positive number"),
])
def test_bad_phi3_ropes(rope, message):
    from kiln.graphs.llama.config import LlamaConfig

    raw = {"model_type": "phi3", **SIZES, "rope_scaling": rope}
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_dict(raw)
    with pytest.raises(ConfigError, match="'partial_rotary_factor' must be a number in"):
        LlamaConfig.from_dict({"model_type": "phi3", **SIZES, "partial_rotary_factor": 1.5})


def test_phi3_has_a_torch_reference_only(models):
    from kiln.graphs import registry

    path, _, _ = models("phi3-fused")
    with pytest.raises(ConfigError, match="'phi3' has a reference in torch only, not jax"):
        registry.architecture({"model_type": "phi3"}).check_framework("phi3", "jax")
