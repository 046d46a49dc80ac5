"""Scaled-dot-product attention: the NumPy reference, which is the spec.

Every other implementation of attention in kiln (the Triton kernel, the ONNX
node, the TensorRT plugin) is checked against :func:`attention`.  It is kept
deliberately plain: no fusion, no tiling, no cleverness, so that a reader can
check it line by line against the maths.  If another implementation and this
file disagree, this file is right unless it is changed on purpose.

Shape vocabulary used in comments throughout:

    B    batch
    H    query heads
    Hkv  key/value heads (H must be a multiple of Hkv; GQA/MQA when smaller)
    T    query length
    P    past length (tokens already in the KV cache)
    S    key length, past + new: S = P + T_new
    D    head dim of queries and keys
    Dv   head dim of values (usually equal to D)

Spec choices, written down once so that implementations can be judged against
them:

* Computation happens in float32, or in float64 when any input is float64.
  float16 inputs are upcast, and the output is cast back to q's dtype.
* Softmax subtracts the row maximum before exponentiating (the stable form),
  and a masked position contributes ``exp(-inf) == 0``, so its probability is
  exactly 0, not merely tiny.
* A query row whose keys are *all* masked (e.g. a fully padded row) has no
  defined softmax.  Here its output is all zeros and its probabilities are all
  zeros.  This is a choice, not maths: a naive softmax gives NaN (0/0), older
  torch SDPA and some fused kernels give NaN, and onnxruntime may return
  something else again (a uniform average, say).  (torch 2.13's CPU SDPA
  happens to return zeros too.)  Tests therefore compare such rows only
  against this spec, never across backends.
* ``causal`` is bottom-right aligned: query i may see key j iff
  ``j <= i + (S - T)``.  In the usual case T == T_new this offset is P, the
  past length, i.e. query i sits at absolute position P + i.  (torch's
  ``is_causal=True`` is top-left aligned and only agrees when T == S.)
  When T > S the first T - S query rows see no key and follow the
  fully-masked-row rule above (as flash-attention does).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["AttentionOutput", "attention"]


class AttentionOutput(NamedTuple):
    """Result of :func:`attention`."""

    out: np.ndarray  # (B, H, T, Dv), in q's dtype
    present_key: np.ndarray  # (B, Hkv, S, D), past then new keys, in k's dtype
    present_value: np.ndarray  # (B, Hkv, S, Dv), past then new values, in v's dtype
    probs: np.ndarray | None  # (B, H, T, S) in the compute dtype, or None


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    causal: bool = False,
    scale: float | None = None,
    past_key: np.ndarray | None = None,
    past_value: np.ndarray | None = None,
    return_probs: bool = False,
    softcap: float = 0.0,
) -> AttentionOutput:
    """Scaled-dot-product attention with optional mask, causality, GQA and KV cache.

    Args:
        q: queries, (B, H, T, D).
        k: new keys for this step, (B, Hkv, T_new, D).
        v: new values for this step, (B, Hkv, T_new, Dv).
        mask: either a key padding mask of shape (B, S) (bool, or 0/1 numbers;
            1/True = attend), or any other mask broadcastable to (B, H, T, S):
            bool means True = attend, floating point means an additive bias
            on the scores (-inf = masked).  Only a 2-D mask is read as key
            padding; pass (B, 1, 1, S) or (T, S)-as-(1, 1, T, S) otherwise.
        causal: apply a bottom-right aligned causal mask (see module docstring).
        scale: multiplier applied to q @ k^T; default 1 / sqrt(D).
        past_key: cached keys, (B, Hkv, P, D); must come with past_value.
        past_value: cached values, (B, Hkv, P, Dv); must come with past_key.
        return_probs: also return the attention probabilities.
        softcap: when > 0, the scaled scores are capped to (-softcap, softcap)
            as ``softcap * tanh(scores / softcap)`` before the mask (Gemma 2's
            attention-logit soft-capping; ONNX Attention's ``softcap``).

    Returns:
        AttentionOutput(out, present_key, present_value, probs).  present_* is
        concat(past, new) along the sequence axis, returned always (it equals
        k / v when there is no past).  probs is None unless return_probs.

    Raises:
        ValueError: on any shape, dtype or head-count inconsistency.
    """
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    for name, arr in (("q", q), ("k", k), ("v", v)):
        _check_float_4d(name, arr)

    B, H, T, D = q.shape
    _, Hkv, T_new, _ = k.shape
    Dv = v.shape[3]

    # --- Shape validation: every message names the argument and its shape. ---
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(
            f"batch size mismatch: q has shape {q.shape} (B={B}), "
            f"k has shape {k.shape}, v has shape {v.shape}"
        )
    if k.shape[3] != D:
        raise ValueError(f"k has shape {k.shape} but its head dim must equal q's D={D} (q shape {q.shape})")
    if v.shape[1] != Hkv or v.shape[2] != T_new:
        raise ValueError(
            f"v has shape {v.shape} but must be (B, Hkv, T_new, Dv) = ({B}, {Hkv}, {T_new}, Dv) to match k {k.shape}"
        )
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(
            f"number of query heads H={H} (q shape {q.shape}) must be a positive multiple of the "
            f"number of key/value heads Hkv={Hkv} (k shape {k.shape})"
        )

    # --- KV cache: present = concat(past, new) along the sequence axis. ---
    if (past_key is None) != (past_value is None):
        raise ValueError("past_key and past_value must be given together (got only one of them)")
    if past_key is not None:
        past_key, past_value = np.asarray(past_key), np.asarray(past_value)
        _check_float_4d("past_key", past_key)
        _check_float_4d("past_value", past_value)
        P = past_key.shape[2]
        if past_key.shape != (B, Hkv, P, D):
            raise ValueError(f"past_key has shape {past_key.shape}, expected (B, Hkv, P, D) = ({B}, {Hkv}, P, {D})")
        if past_value.shape != (B, Hkv, P, Dv):
            raise ValueError(
                f"past_value has shape {past_value.shape}, expected (B, Hkv, P, Dv) = ({B}, {Hkv}, {P}, {Dv})"
            )
        # The cache keeps the dtype of the new keys/values (what a kernel writes back).
        present_key = np.concatenate([past_key.astype(k.dtype, copy=False), k], axis=2)
        present_value = np.concatenate([past_value.astype(v.dtype, copy=False), v], axis=2)
    else:
        present_key, present_value = k, v
    S = present_key.shape[2]

    # --- Compute dtype: float32, or float64 if any input already is. ---
    inputs = [q, k, v] + ([past_key, past_value] if past_key is not None else [])
    cdt = np.float64 if any(a.dtype == np.float64 for a in inputs) else np.float32

    if scale is None:
        scale = 1.0 / math.sqrt(D)  # D is the q/k head dim, not Dv
    scale = float(scale)

    # --- Masks, reduced to a boolean "may attend" and an additive bias. ---
    # keep: bool broadcastable to (B, H, T, S), True = attend (None = all).
    # bias: float broadcastable to (B, H, T, S), added to the scores (None = 0).
    keep, bias = _interpret_mask(mask, B, H, T, S, cdt)
    if causal:
        # Bottom-right alignment: the last query lines up with the last key.
        offset = S - T  # == P when T == T_new
        i = np.arange(T)[:, None]
        j = np.arange(S)[None, :]
        causal_keep = j <= i + offset  # (T, S), broadcasts over (B, H)
        keep = causal_keep if keep is None else keep & causal_keep

    # --- GQA: query head h reads kv head h // (H // Hkv) (= repeat_kv). ---
    group = H // Hkv
    kx = np.repeat(present_key.astype(cdt, copy=False), group, axis=1)  # (B, H, S, D)
    vx = np.repeat(present_value.astype(cdt, copy=False), group, axis=1)  # (B, H, S, Dv)

    # --- Scores. ---
    scores = (q.astype(cdt, copy=False) @ kx.swapaxes(-1, -2)) * cdt(scale)  # (B, H, T, S)
    if softcap:
        scores = cdt(softcap) * np.tanh(scores / cdt(softcap))
    if bias is not None:
        scores = scores + bias
    if keep is not None:
        scores = np.where(keep, scores, -np.inf)
    scores = np.broadcast_to(scores, (B, H, T, S))

    # --- Stable softmax with an explicit rule for fully masked rows. ---
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)  # (B, H, T, 1)
    fully_masked = row_max == -np.inf
    # Subtracting 0 instead of -inf keeps -inf - (-inf) = NaN out of the picture;
    # every entry of such a row is -inf, so exp gives exact zeros.
    row_max = np.where(fully_masked, 0.0, row_max).astype(cdt, copy=False)
    e = np.exp(scores - row_max)  # masked entries: exp(-inf) == 0 exactly
    denom = e.sum(axis=-1, keepdims=True)
    # Fully masked rows have denom 0; dividing 0 by 1 makes their probs zeros.
    probs = e / np.where(fully_masked, 1.0, denom).astype(cdt, copy=False)

    out = probs @ vx  # (B, H, T, Dv); fully masked rows are exactly 0
    return AttentionOutput(
        out=out.astype(q.dtype, copy=False),
        present_key=present_key,
        present_value=present_value,
        probs=probs if return_probs else None,
    )


def _check_float_4d(name: str, arr: np.ndarray) -> None:
    if arr.ndim != 4:
        raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {arr.dtype} (shape {arr.shape})")


def _interpret_mask(
    mask: np.ndarray | None, B: int, H: int, T: int, S: int, cdt: type[np.floating]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Split a user mask into (keep, bias); see ``attention``'s ``mask`` argument."""
    if mask is None:
        return None, None
    mask = np.asarray(mask)

    if mask.ndim == 2:
        # Key padding mask: one 0/1 per (batch row, key), shared by all heads and queries.
        if mask.shape != (B, S):
            raise ValueError(
                f"mask has shape {mask.shape}; a 2-D mask is a key padding mask and must be "
                f"(B, S) = ({B}, {S}) where S = past + new key length"
            )
        if mask.dtype != np.bool_:
            # Catch an additive (T, S) mask passed where padding was meant.
            if not np.isin(mask, (0, 1)).all():
                raise ValueError(
                    f"mask has shape {mask.shape} and dtype {mask.dtype}: a 2-D mask is a key padding "
                    f"mask and must hold only 0/1 (or be bool); for an additive mask use shape (1, 1, T, S)"
                )
            mask = mask != 0
        return mask[:, None, None, :], None  # (B, 1, 1, S)

    if mask.ndim > 4:
        raise ValueError(f"mask has shape {mask.shape}; it must be (B, S) or broadcastable to (B, H, T, S)")
    try:
        np.broadcast_shapes(mask.shape, (B, H, T, S))
    except ValueError:
        raise ValueError(
            f"mask has shape {mask.shape}, which does not broadcast to (B, H, T, S) = ({B}, {H}, {T}, {S})"
        ) from None

    if mask.dtype == np.bool_:
        return mask, None
    if np.issubdtype(mask.dtype, np.floating):
        # Additive: -inf masks; +inf or NaN have no meaning and would poison the softmax.
        if np.isnan(mask).any() or np.isposinf(mask).any():
            raise ValueError(f"additive mask (shape {mask.shape}) must not contain NaN or +inf")
        return None, mask.astype(cdt, copy=False)
    # Integer masks beyond 2-D are ambiguous (keep-mask of 0/1, or additive bias?).
    raise ValueError(
        f"mask has shape {mask.shape} and dtype {mask.dtype}; a mask other than a 2-D key padding mask "
        f"must be bool (True = attend) or floating point (additive)"
    )
