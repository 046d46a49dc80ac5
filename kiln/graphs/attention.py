"""Attention, chosen by name. The model owns parameters and shapes; this module owns the math.

``eager`` is the readable spec (and the only one that can return the probabilities); ``sdpa`` calls
``torch.nn.functional.scaled_dot_product_attention``, which ``torch.onnx`` at opset >= 23 turns into ONE standard
ONNX ``Attention`` node. Where that is not enough (probabilities returned, a KV cache), the models call kiln's
custom ops (``kiln.kernels.attention.torch_ops``), each also one node. The NumPy twin of this math is
``kiln.kernels.attention.reference``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.kernels.attention.torch_ops import attention_kv, attention_probs  # noqa: F401 (the models call attention_kv)


def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
          causal: bool, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, T, D), k/v (B, Hkv, S, D), mask bool broadcastable to (B, H, T, S) with True = attend (or float:
    added to the scaled scores; not with ``causal``); ``softcap`` >
    0 caps the scaled scores to softcap * tanh(scores / softcap) before the mask (Gemma 2)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv != H:  # grouped-query attention: each kv head serves H // Hkv query heads
        k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(D))  # (B, H, T, S)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if causal:  # bottom-right aligned: query i sits at absolute position S - T + i
        keep = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        mask = keep if mask is None else mask & keep
    if mask is not None and mask.dtype != torch.bool:  # additive (DeBERTa's relative-position bias)
        scores = scores + mask
    elif mask is not None:
        # finfo.min rather than -inf: a fully padded row then averages v instead of producing NaN, as transformers does.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    return probs @ v, probs  # (B, H, T, D), (B, H, T, S)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
         causal: bool) -> tuple[torch.Tensor, None]:
    gqa = k.shape[1] != q.shape[1]
    T, S = q.shape[2], k.shape[2]
    # SDPA takes a mask or is_causal, not both; and its is_causal is top-left aligned, which differs from the
    # bottom-right alignment here when T != S (a KV cache). Fold causality into the mask in either case.
    if causal and (mask is not None or T != S):
        keep = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        mask, causal = (keep if mask is None else mask & keep), False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
    return out, None


def head_mask_per_layer(head_mask, layers: int, heads: int, pruned: bool = False) -> torch.Tensor | None:
    """transformers' ``head_mask``: (heads,) for every layer or (layers, heads), 1 keeps a head and 0 masks it (values
    between scale it) -> a (layers, heads) float tensor, or None. The shape is checked always, the values where they
    are known (not while torch.export traces the graph, whose head_mask is an input)."""
    if head_mask is None:
        return None
    from kiln.errors import InputError

    if pruned:  # as in transformers, whose head_mask of a pruned model fails to broadcast
        raise InputError("head_mask needs every head of every layer; this model has pruned heads (config.json "
                         "pruned_heads). Mask heads of the unpruned model, or prune instead of masking.")
    mask = torch.as_tensor(head_mask, dtype=torch.float32)
    if tuple(mask.shape) == (heads,):
        mask = mask[None].expand(layers, heads)
    if tuple(mask.shape) != (layers, heads):
        raise InputError(f"head_mask must have shape ({heads},) or ({layers}, {heads}) (layers, heads), got "
                         f"{tuple(mask.shape)}.")
    if not torch.compiler.is_compiling() and (not bool(torch.isfinite(mask).all()) or mask.min() < 0 or mask.max() > 1):
        raise InputError("head_mask values must be between 0 (mask the head) and 1 (keep it).")
    return mask


def mask_heads(y: torch.Tensor, probs: torch.Tensor | None, head_mask: torch.Tensor | None):
    """Attention output y (B, H, T, D) and probabilities (B, H, T, S) with each head scaled by ``head_mask`` (H,):
    transformers multiplies the probabilities, and (p * m) v = m (p v), so the fused node's output is scaled after
    it and the exported graph keeps one Attention node per layer."""
    if head_mask is None:
        return y, probs
    weight = head_mask.to(y.dtype).view(1, -1, 1, 1)
    return y * weight, (probs * weight if probs is not None else None)


ATTENTION_FUNCTIONS = {"eager": eager, "sdpa": sdpa}


def cached_attention(q, k, v, mask, past=None, *, scale: float, impl: str = "sdpa", return_probs: bool = False):
    """A decoder's self-attention over its KV cache: q (B, H, T, D), the new k/v (B, Hkv, T, D), ``past`` (key,
    value) (B, Hkv, P, D) or None, ``mask`` bool (B, 1, T, P + T) with causality folded in. Returns ``(out,
    present, probs)``, present = past + new keys/values. With a past it is kiln's ``attention_kv`` op (one ONNX
    Attention node with past/present); ``return_probs`` uses the readable eager math instead."""
    if return_probs:  # the readable eager math; not a single exported node
        k_all = torch.cat([past[0], k], dim=2) if past is not None else k
        v_all = torch.cat([past[1], v], dim=2) if past is not None else v
        out, probs = attention(q, k_all, v_all, mask=mask, scale=scale, impl="eager", return_probs=True)
        return out, (k_all, v_all), probs
    if past is not None:  # one op -> one ONNX Attention node with past/present
        out, *present = attention_kv(q, k, v, mask, past[0], past[1], scale)
        return out, tuple(present), None
    out, _ = attention(q, k, v, mask=mask, scale=scale, impl=impl)
    return out, (k, v), None


def attention(q, k, v, *, mask=None, scale=None, causal=False, impl: str = "sdpa", return_probs: bool = False):
    """Returns ``(out, probs)``; ``probs`` is None unless ``return_probs`` (which always uses the eager math)."""
    if impl not in ATTENTION_FUNCTIONS:
        raise ValueError(f"Unknown attention implementation {impl!r}; choose one of {sorted(ATTENTION_FUNCTIONS)}.")
    if return_probs and mask is not None and not causal and k.shape[1] == q.shape[1]:
        # One op with two outputs, so an exported graph keeps one fused Attention node per layer.
        return attention_probs(q, k, v, mask, scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    fn = eager if return_probs else ATTENTION_FUNCTIONS[impl]
    out, probs = fn(q, k, v, mask, scale, causal)
    return out, (probs if return_probs else None)
