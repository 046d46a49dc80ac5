"""The PyTorch references on a CUDA GPU against transformers on the same GPU (the oracle), in fp32 and half precision.

CPU tests cover the math; these catch what only a device shows: buffers or masks created on the CPU, dtype promotion
under fp16/bf16, and SDPA picking a fused CUDA backend. In half precision the bound is relative to the oracle's own
error: kiln in that dtype must be no further from transformers fp32 than twice transformers in that dtype (plus a
little). Skipped without a GPU (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import kiln
from conftest import TINY_LLAMA, make_causal_lm

pytestmark = pytest.mark.gpu
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SLACK = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # fp32: summation order only (no TF32)


def padded_batch(vocab: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in ((1, 5), (2, 9)):
        mask[row, slice(0, pad) if left else slice(12 - pad, 12)] = 0
    return ids.cuda(), mask.cuda()


def assert_as_close_as_oracle(ours, theirs_half, exact, valid, dtype) -> None:
    """ours and theirs_half computed in ``dtype``; exact is transformers fp32; compared where ``valid``."""
    assert ours.device.type == "cuda" and ours.dtype == dtype
    ours_err = (ours.float() - exact)[valid].abs().max().item()
    theirs_err = 0.0 if dtype == torch.float32 else (theirs_half.float() - exact)[valid].abs().max().item()
    assert ours_err <= 2 * theirs_err + SLACK[dtype], (ours_err, theirs_err)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_bert_on_cuda_matches_transformers(checkpoints, dtype):
    import transformers

    path, _ = checkpoints("bert", "feature-extraction")
    load = lambda: transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval().cuda()  # noqa: E731
    exact, half = load(), load().to(dtype)
    ours = kiln.from_pretrained(str(path), task="feature-extraction").to(device="cuda", dtype=dtype)
    ids, mask = padded_batch(exact.config.vocab_size, left=False)
    with torch.no_grad():
        want = exact(input_ids=ids, attention_mask=mask).last_hidden_state
        theirs = half(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(input_ids=ids, attention_mask=mask)["last_hidden_state"]
    assert_as_close_as_oracle(got, theirs, want, mask.bool(), dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_llama_on_cuda_matches_transformers_and_its_cache(tmp_path, dtype):
    exact = make_causal_lm(tmp_path, "llama", **TINY_LLAMA).cuda()
    half = type(exact).from_pretrained(tmp_path).eval().cuda().to(dtype)
    ours = kiln.from_pretrained(str(tmp_path), task="text-generation").to(device="cuda", dtype=dtype)
    ids, mask = padded_batch(TINY_LLAMA["vocab_size"], left=True)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    valid = mask.bool()
    with torch.no_grad():
        want = exact(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        theirs = half(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        full = ours(ids, mask, pos)
        assert_as_close_as_oracle(full["logits"], theirs, want, valid, dtype)
        # A prefix, then one token at a time through the cache, on the device: the same logits as the full forward
        # (up to the dtype's rounding: the two paths multiply in different shapes).
        out = ours(ids[:, :8], mask[:, :8], pos[:, :8])
        steps = []
        for t in range(8, 12):
            out = ours(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], past_key_values=out["present_key_values"])
            steps.append(out["logits"])
    later = valid[:, 8:]
    diff = (torch.cat(steps, 1).float() - full["logits"][:, 8:].float())[later].abs().max().item()
    assert diff <= SLACK[dtype] * want.abs().max().item(), diff
