"""kiln's attention as PyTorch custom ops, each exported as ONE ONNX ``Attention`` node (``onnx.translation_table``).

torch.onnx turns ``F.scaled_dot_product_attention`` into one node by itself; these two cases need an op of their own:

- ``kiln::attention_probs``: attention that also returns its probabilities (transformers' ``output_attentions``),
  one node whose ``qk_matmul_output`` (mode 3) carries them, so a layer stays one node.
- ``kiln::attention_kv``: decoder attention with a KV cache: past key/value in, present key/value out.

Eagerly each op is plain torch math (the spec is ``kiln.graphs.attention.eager`` and the NumPy ``reference.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def apply_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A bool mask (True = attend) puts masked scores at float's minimum; a float mask is added, as ONNX Attention's
    ``attn_mask`` of either type."""
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores + mask


@torch.library.custom_op("kiln::attention_probs", mutates_args=())
def attention_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, T|S, D), mask bool (B, 1|H, T, S) with True = attend, or float: added to the scaled scores
    (DeBERTa's relative-position bias). Returns out (B, H, T, D) and the probabilities (B, H, T, S); a fully masked
    row averages v (scores at float's minimum, not -inf: no NaN)."""
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, S)
    probs = apply_mask(scores, mask).softmax(dim=-1)
    return (probs @ v).contiguous(), probs.contiguous()


@attention_probs.register_fake
def _(q, k, v, mask, scale):
    B, H, T, _ = q.shape
    return q.new_empty(B, H, T, v.shape[-1]), q.new_empty(B, H, T, k.shape[2])


@torch.library.custom_op("kiln::attention_kv", mutates_args=())
def attention_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, past_key: torch.Tensor,
                 past_value: torch.Tensor, scale: float,
                 softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, H, T, D); k, v (B, Hkv, T, D); past (B, Hkv, P, D), P may be 0; mask bool (B, 1, T, P + T), True =
    attend, causality already folded in. Returns out (B, H, T, D) and the presents (B, Hkv, P + T, D). Grouped-query
    heads are allowed (onnxruntime's Attention takes them as they are). ``softcap`` > 0 caps the scaled scores to
    softcap * tanh(scores / softcap) before the mask (Gemma 2; ONNX Attention's attribute of that name)."""
    present_key = torch.cat([past_key, k], dim=2)
    present_value = torch.cat([past_value, v], dim=2)
    if softcap:  # SDPA has no soft-capping: the plain math
        group = q.shape[1] // present_key.shape[1]
        keys = present_key.repeat_interleave(group, dim=1)
        scores = (q @ keys.transpose(-1, -2)) * scale
        scores = (torch.tanh(scores / softcap) * softcap).masked_fill(~mask, torch.finfo(scores.dtype).min)
        out = scores.softmax(dim=-1) @ present_value.repeat_interleave(group, dim=1)
    else:
        out = F.scaled_dot_product_attention(q, present_key, present_value, attn_mask=mask, scale=scale,
                                             enable_gqa=present_key.shape[1] != q.shape[1])
    return out.contiguous(), present_key, present_value


@attention_kv.register_fake
def _(q, k, v, mask, past_key, past_value, scale, softcap=0.0):
    B, Hkv, P, D = past_key.shape
    S = P + k.shape[2]
    return q.new_empty(q.shape[:3] + (v.shape[-1],)), k.new_empty(B, Hkv, S, D), v.new_empty(B, Hkv, S, v.shape[-1])
