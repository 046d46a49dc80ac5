"""Attention for the JAX references, chosen by name as in ``graphs/attention.py``. Layout (B, T, H, D), flax's.

``sdpa`` calls ``flax.nnx.dot_product_attention`` (looked up at call time: jax2onnx swaps in its own while tracing).
Eagerly that runs ``jax.nn.dot_product_attention``; under jax2onnx at opset >= 23 it becomes ONE standard ONNX
``Attention`` node, grouped-query heads included (K/V keep their Hkv heads). The conditions of jax2onnx's nnx
plugin, which these functions meet: 4-D (B, T, H, D) inputs with static head counts and head dim, opset >= 23, no
``deterministic`` call parameter, no dropout, and the default scale 1/sqrt(D), the only one the plugin emits (it
drops a custom scale, so none is offered here). The bool mask goes in as the node's ``attn_mask`` unchanged, so the
models pass it as (B, 1, T, S): onnxruntime broadcasts the head axis but not the query axis.
``jax.nn.dot_product_attention`` itself would not do: its jax2onnx plugin always decomposes into MatMul/Softmax.

``eager`` is the readable math and the only one that returns the probabilities; exported, it stays MatMul/Softmax.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def eager(q, k, v, mask):
    """q (B, T, H, D), k/v (B, S, Hkv, D), mask bool broadcastable to (B, H, T, S) with True = attend."""
    H, Hkv, D = q.shape[2], k.shape[2], q.shape[3]
    if Hkv != H:  # grouped-query attention: each kv head serves H // Hkv query heads
        k = jnp.repeat(k, H // Hkv, axis=2)  # (B, S, H, D)
        v = jnp.repeat(v, H // Hkv, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) * (1.0 / math.sqrt(D))  # (B, H, T, S)
    if mask is not None:
        # finfo.min rather than -inf: a fully padded row then averages v instead of producing NaN, as transformers does.
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, v), probs  # (B, T, H, D), (B, H, T, S)


def sdpa(q, k, v, mask):
    # Eagerly jax.nn fills masked scores with -0.7 * finfo.max, not -inf: same softmax as ``eager``'s finfo.min, and
    # a fully masked row averages v as well.
    return nnx.dot_product_attention(q, k, v, mask=mask), None


ATTENTION_FUNCTIONS = {"eager": eager, "sdpa": sdpa}


def attention(q, k, v, *, mask=None, impl: str = "sdpa", return_probs: bool = False):
    """Returns ``(out, probs)``; ``probs`` is None unless ``return_probs`` (which always uses the eager math)."""
    if impl not in ATTENTION_FUNCTIONS:
        raise ValueError(f"Unknown attention implementation {impl!r}; choose one of {sorted(ATTENTION_FUNCTIONS)}.")
    return (eager if return_probs else ATTENTION_FUNCTIONS[impl])(q, k, v, mask)
