"""Gemma-family reference (Gemma 2, Gemma 3 text) vs transformers on tiny random configs that exercise each flag:
local and global layers with a small window, soft-capping, query_pre_attn_scalar, q/k norms, per-layer RoPE."""

from __future__ import annotations

import pytest
import torch
import transformers

import kiln
from conftest import make_causal_lm
from kiln.errors import ConfigError
from kiln.graphs.gemma.config import GemmaConfig

SIZES = dict(vocab_size=97, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, query_pre_attn_scalar=16,
             sliding_window=4)
LOCAL_GLOBAL = {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
VARIANTS = {
    "gemma2": ("gemma2", {}),  # softcaps 50 / 30 by default, local layers first
    "gemma2-tight-caps": ("gemma2", dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                         attn_implementation="eager")),
    "gemma3": ("gemma3_text", dict(sliding_window_pattern=2)),
    "gemma3-scaled-global-rope-untied": ("gemma3_text", dict(sliding_window_pattern=3, tie_word_embeddings=False,
                                                             final_logit_softcapping=5.0, **LOCAL_GLOBAL)),
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
    assert any(ours.config.sliding(i) for i in range(3)) and not all(ours.config.sliding(i) for i in range(3))
    ids, mask, pos = left_padded()
    with torch.no_grad():
        a = ours(ids, mask, pos, output_hidden_states=True)
        b = theirs(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        valid = mask.bool()
        torch.testing.assert_close(a["logits"][valid], b.logits[valid], atol=1e-4, rtol=0)
        for x, y in zip(a["hidden_states"], b.hidden_states, strict=True):
            torch.testing.assert_close(x[valid], y[valid], atol=1e-4, rtol=0)
        # The cache: a prefix, then one token at a time (past the window), equals the full forward.
        prefix = ours(ids[:, :4], mask[:, :4], pos[:, :4])
        past, steps = prefix["present_key_values"], []
        for t in range(4, 10):
            out = ours(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], past_key_values=past)
            past = out["present_key_values"]
            steps.append(out["logits"])
        # a local layer keeps window - 1 keys (as transformers' sliding-window cache), a global layer all of them
        assert [p[0].shape[2] for p in past] == [3 if ours.config.sliding(i) else 10 for i in range(3)]
        later = valid[:, 4:]  # padded query positions have no defined output
        torch.testing.assert_close(torch.cat(steps, 1)[later], a["logits"][:, 4:][later], atol=1e-5, rtol=0)


def test_attentions_match_transformers_eager(models):
    _, theirs, ours = models("gemma2-tight-caps")
    ids, mask, pos = left_padded()
    with torch.no_grad():
        a = ours(ids, mask, pos, output_attentions=True)["attentions"]
        b = theirs(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True).attentions
    valid = mask.bool()
    for x, y in zip(a, b, strict=True):  # (B, H, T, S): compare the rows of real tokens
        torch.testing.assert_close(x.transpose(1, 2)[valid], y.transpose(1, 2)[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_tokens_match_generate(name, models):
    """A plain greedy loop over the reference and its cache gives transformers.generate's tokens, batched or not,
    well past the window."""
    _, theirs, ours = models(name)
    ids, mask, _ = left_padded(seed=1)
    for rows in (slice(0, 1), slice(0, 3)):
        i, m = ids[rows], mask[rows]
        expected = theirs.generate(input_ids=i, attention_mask=m, max_new_tokens=8, do_sample=False)[:, i.shape[1]:]
        with torch.no_grad():
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            out = ours(i, m, pos)
            tokens = []
            for _ in range(8):
                nxt = out["logits"][:, -1].argmax(-1, keepdim=True)
                tokens.append(nxt)
                m = torch.cat([m, torch.ones_like(nxt)], 1)
                pos = pos[:, -1:] + 1
                out = ours(nxt, m, pos, past_key_values=out["present_key_values"])
        got = torch.cat(tokens, 1)
        for row_got, row_expected in zip(got.tolist(), expected.tolist()):
            end = row_expected.index(1) + 1 if 1 in row_expected else 8  # after EOS (id 1) transformers pads
            assert row_got[:end] == row_expected[:end], name


@pytest.mark.parametrize("name", ["gemma2", "gemma3-scaled-global-rope-untied"])
def test_save_pretrained_round_trip(name, models, tmp_path):
    _, theirs, ours = models(name)
    ours.save_pretrained(tmp_path)
    back = type(theirs).from_pretrained(tmp_path).eval()
    ids, mask, pos = left_padded()
    valid = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask, position_ids=pos).logits[valid],
                                   ours(ids, mask, pos)["logits"][valid], atol=1e-6, rtol=0)


# A Gemma 3 config.json as released before transformers 5 (google/gemma-3-270m's keys) and a Gemma 2 one.
OLD_GEMMA3 = {"model_type": "gemma3_text", **SIZES, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
              "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window_pattern": 3,
              "attn_logit_softcapping": None, "final_logit_softcapping": None}
OLD_GEMMA2 = {"model_type": "gemma2", **SIZES, "rope_theta": 10_000.0, "cache_implementation": "hybrid"}


@pytest.mark.parametrize("raw", [OLD_GEMMA3, OLD_GEMMA2, {"model_type": "gemma3_text", **SIZES}],
                         ids=["gemma3-4.x", "gemma2-4.x", "gemma3-defaults"])
def test_configs_read_as_transformers_reads_them(raw):
    theirs = transformers.AutoConfig.for_model(**raw)
    ours = GemmaConfig.from_dict(raw)
    assert list(ours.layer_types) == theirs.layer_types
    params = theirs.rope_parameters
    full, local = (params["full_attention"], params["sliding_attention"]) if "full_attention" in params else (params,) * 2
    for mine, theirs_ in ((ours.rope, full), (ours.local_rope, local)):
        assert mine["rope_theta"] == theirs_["rope_theta"] and mine["rope_type"] == theirs_["rope_type"]
        assert mine.get("factor") == theirs_.get("factor")
    assert (ours.attn_logit_softcapping, ours.final_logit_softcapping) == \
        (theirs.attn_logit_softcapping, theirs.final_logit_softcapping)
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings and ours.head_dim == theirs.head_dim


def test_gemma3_defaults_as_transformers():
    """Left out of config.json: head_dim 256, every sixth layer global, RoPE bases 1M / 10k, no soft-capping."""
    ours = GemmaConfig.from_dict({"model_type": "gemma3_text", "vocab_size": 10, "hidden_size": 8,
                                  "intermediate_size": 8, "num_hidden_layers": 7, "num_attention_heads": 2})
    assert ours.head_dim == 256 and ours.layer_types.count("full_attention") == 1 and ours.layer_types[5] == "full_attention"
    assert (ours.rope["rope_theta"], ours.local_rope["rope_theta"]) == (1e6, 1e4)
    assert ours.attention_softcap == 0.0 and ours.final_logit_softcapping is None


@pytest.mark.parametrize("change, message", [
    ({"hidden_activation": "relu"}, "'hidden_activation' 'relu' is not supported"),
    ({"layer_types": ["full_attention"]}, "must list one of full_attention, sliding_attention per layer"),
    ({"sliding_window_pattern": 0}, "'sliding_window_pattern' must be a positive integer"),
    ({"final_logit_softcapping": -1.0}, "'final_logit_softcapping' must be a positive number or null"),
    ({"query_pre_attn_scalar": 0}, "'query_pre_attn_scalar' must be a positive number"),
    ({"use_bidirectional_attention": True}, "EmbeddingGemma"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}}, "'yarn' is not supported"),
])
def test_bad_configs(change, message):
    with pytest.raises(ConfigError, match=message):
        GemmaConfig.from_dict({"model_type": "gemma3_text", **SIZES, **change})
