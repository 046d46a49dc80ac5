"""The kiln PyTorch reference of DeBERTa-v2/v3 against transformers' DebertaV2 classes on tiny random configs."""

from __future__ import annotations

import pytest
import torch
from conftest import make_deberta

from kiln.errors import ConfigError
from kiln.graphs.checkpoint import from_pretrained

def batch(config, seed: int = 0, lengths=(20, 13, 4)) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    ids[mask == 0] = config.pad_token_id
    out = {"input_ids": ids, "attention_mask": mask}
    if config.type_vocab_size:
        out["token_type_ids"] = (torch.arange(max(lengths))[None, :] >= 6).long() * mask
    return out


def assert_close(got, want, what, atol=1e-4, mask=None):
    """Equal within atol at real positions: ``mask`` (B, T) leaves out padding queries, whose rows transformers'
    DeBERTa lets attend nothing (kiln lets them attend the real keys; see model_torch.DebertaV2Model.forward)."""
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{what}[{i}]", atol, mask)
        return
    assert got.shape == want.shape, f"{what}: {tuple(got.shape)} vs {tuple(want.shape)}"
    if mask is not None and got.dim() >= 2 and got.shape[:2] == mask.shape:  # (B, T, ...)
        got, want = got[mask.bool()], want[mask.bool()]
    elif mask is not None and got.dim() == 4:  # attentions (B, H, T, T): real query rows
        rows = mask.bool()[:, None, :, None].expand_as(got)
        got, want = got[rows], want[rows]
    diff = (got - want).abs().max().item()
    assert diff <= atol, f"{what}: max |kiln - transformers| = {diff:.3g}"


OUTPUTS = {"feature-extraction": ("last_hidden_state",), "text-classification": ("logits",),
           "token-classification": ("logits",), "question-answering": ("start_logits", "end_logits"),
           "fill-mask": ("logits",)}


@pytest.mark.parametrize("variant,task", [("v3", t) for t in OUTPUTS] + [("v2", "feature-extraction"),
                                          ("v2-mlm", "fill-mask"), ("v3-narrow", "fill-mask"),
                                          ("c2p-only", "text-classification"),
                                          ("absolute", "feature-extraction")])
@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_matches_transformers(tmp_path, variant, task, attn_impl):
    path, theirs = make_deberta(tmp_path / "ckpt", task, variant)
    ours = from_pretrained(path, task=task, attn_impl=attn_impl)
    inputs = batch(theirs.config)
    with torch.no_grad():
        want = theirs(**inputs, output_hidden_states=True, output_attentions=True)
        got = ours(**inputs, output_hidden_states=True, output_attentions=True)
    assert set(got) == {*OUTPUTS[task], "hidden_states", "attentions"}
    for key in got:
        assert_close(got[key], want[key], f"{variant}/{task}/{attn_impl} {key}", mask=inputs["attention_mask"])


def test_log_buckets_match_transformers():
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    from kiln.graphs.deberta_v2.model_torch import log_buckets

    relative = torch.arange(600)[:, None] - torch.arange(600)[None, :]
    assert torch.equal(log_buckets(relative, 256, 512), make_log_bucket_position(relative, 256, 512).long())


def test_save_pretrained_round_trip(tmp_path):
    import transformers

    path, theirs = make_deberta(tmp_path / "ckpt", "text-classification")
    ours = from_pretrained(path, task="text-classification")
    ours.save_pretrained(tmp_path / "saved")
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    inputs = batch(theirs.config)
    with torch.no_grad():
        assert_close(again(**inputs).logits, theirs(**inputs).logits, "round trip", atol=0)
    assert_close(ours(**inputs)["logits"], theirs(**inputs).logits, "kiln", atol=1e-4)


def test_head_mask_equals_a_zeroed_head(tmp_path):
    """transformers' DeBERTa takes no head_mask; masking a head equals zeroing its value projection there."""
    import transformers

    path, theirs = make_deberta(tmp_path / "ckpt", "feature-extraction")
    ours = from_pretrained(path)
    head_mask = torch.ones(2, 4)
    head_mask[1, 2] = 0
    with torch.no_grad():
        value = theirs.encoder.layer[1].attention.self.value_proj
        value.weight[16:24] = 0
        value.bias[16:24] = 0
        inputs = batch(theirs.config)
        assert_close(ours(**inputs, head_mask=head_mask)["last_hidden_state"], theirs(**inputs).last_hidden_state,
                     "head_mask", mask=inputs["attention_mask"])
    assert isinstance(theirs, transformers.DebertaV2Model)


@pytest.mark.parametrize("overrides,message", [
    ({"pos_att_type": ["c2p", "x2y"]}, "pos_att_type.*'x2y'"),
    ({"norm_rel_ebd": "batch_norm"}, "norm_rel_ebd"),
    ({"pooler_hidden_size": 16}, "pooler_hidden_size"),
    ({"hidden_act": "mish"}, "hidden_act"),
    ({"num_attention_heads": 5}, "divisible"),
    ({"conv_kernel_size": 2}, "conv_kernel_size"),
])
def test_bad_configs(tmp_path, overrides, message):
    from kiln.graphs.deberta_v2.config import DebertaV2Config

    path, theirs = make_deberta(tmp_path / "ckpt")
    raw = {**theirs.config.to_dict(), **overrides}
    with pytest.raises(ConfigError, match=message):
        DebertaV2Config.from_dict(raw)
