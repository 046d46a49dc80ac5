"""LLaMA family in JAX (flax nnx): the sibling of ``model_torch.py``, same classes, parameter names and shapes
(PyTorch layout), same inputs and outputs, KV cache included. ``attn_impl`` picks the attention math
(``graphs/attention_jax.py``): ``sdpa`` exports as one ONNX ``Attention`` node per layer through jax2onnx, ``eager``
as MatMul/Softmax; ``output_attentions`` always uses ``eager``. Inputs may be NumPy or jax arrays.

Shapes: B batch, T new tokens, P cached tokens, S = P + T, C hidden, H query heads, Hkv key/value heads, D head dim.
The cache keeps transformers' (B, Hkv, S, D) layout; attention runs on flax's (B, T, H, D).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kiln.graphs.attention_jax import attention
from kiln.graphs.checkpoint import SavePretrainedMixin
from kiln.graphs.layers_jax import Embedding, Linear, StateDict
from kiln.graphs.llama.config import LlamaConfig


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps) * self.weight[...]




def rotate_half(x):
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.concatenate((-b, a), axis=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin  # x (B, T, H, D); cos/sin (B, T, 1, D)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, attn_impl: str):
        self.H, self.Hkv, self.D, self.attn_impl = config.num_attention_heads, config.num_key_value_heads, config.head_dim, attn_impl
        self.q = Linear(config.hidden_size, self.H * self.D, bias=config.qkv_bias)
        self.k = Linear(config.hidden_size, self.Hkv * self.D, bias=config.qkv_bias)
        self.v = Linear(config.hidden_size, self.Hkv * self.D, bias=config.qkv_bias)
        self.o = Linear(self.H * self.D, config.hidden_size, bias=config.o_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # Qwen3
            self.q_norm, self.k_norm = RMSNorm(self.D, config.rms_norm_eps), RMSNorm(self.D, config.rms_norm_eps)

    def __call__(self, x, cos, sin, mask, past=None, return_probs=False):
        B, T, _ = x.shape
        q = self.q(x).reshape(B, T, self.H, self.D)  # (B, T, H, D)
        k = self.k(x).reshape(B, T, self.Hkv, self.D)  # (B, T, Hkv, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v(x).reshape(B, T, self.Hkv, self.D)  # (B, T, Hkv, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        present = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, Hkv, T, D)
        if past is not None:
            # lax, not jnp.concatenate: jax2onnx's jnp.concatenate loses the size of a symbolic axis (P + T).
            present = tuple(jax.lax.concatenate([p, n], 2) for p, n in zip(past, present))  # (B, Hkv, S, D)
        k_all, v_all = (t.transpose(0, 2, 1, 3) for t in present)  # (B, S, Hkv, D)
        y, probs = attention(q, k_all, v_all, mask=mask, impl=self.attn_impl, return_probs=return_probs)
        return self.o(y.reshape(B, T, self.H * self.D)), present, probs  # (B, T, C)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        self.gate = Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up = Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Layer(nnx.Module):
    """Pre-norm block."""

    def __init__(self, config: LlamaConfig, attn_impl: str):
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, attn_impl)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def __call__(self, x, cos, sin, mask, past=None, return_probs=False):
        a, present, probs = self.attn(self.attn_norm(x), cos, sin, mask, past, return_probs)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), present, probs


def decoder_mask(attention_mask, T: int, sliding_window: int | None = None):
    """(B, S) padding mask over past + new tokens -> bool (B, 1, T, S): causal (query i sits at P + i), padding,
    and the sliding window. Rows with nothing to attend to (left-padding queries) attend to every key instead: their
    outputs are never used, and an all-masked row would put NaN into the cache."""
    B, S = attention_mask.shape
    query = jax.lax.broadcasted_iota(jnp.int32, (T, S), 0) + (S - T)  # absolute position of each query
    key = jax.lax.broadcasted_iota(jnp.int32, (T, S), 1)
    keep = key <= query  # (T, S)
    if sliding_window is not None:
        keep = keep & (key > query - sliding_window)
    keep = keep[None, None] & (attention_mask[:, None, None, :] != 0)  # (B, 1, T, S)
    return keep | ~keep.any(axis=-1, keepdims=True)


class LlamaForCausalLM(SavePretrainedMixin, StateDict, nnx.Module):
    """Returns ``logits`` (B, T, V) and ``present_key_values`` (per layer (key, value), each (B, Hkv, S, D)); with
    ``output_hidden_states`` / ``output_attentions`` also ``hidden_states`` and ``attentions``."""

    task = "text-generation"

    def __init__(self, config: LlamaConfig, attn_impl: str = "sdpa"):
        self.config = config
        self.embed = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nnx.List([Layer(config, attn_impl) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, bias=False)
        self.inv_freq = nnx.Variable(jnp.asarray(config.inverse_frequencies()))  # a buffer: not a Param, not saved

    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                 output_hidden_states=False, output_attentions=False):
        B, T = input_ids.shape
        P = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = jnp.ones((B, P + T), jnp.int32)
        if position_ids is None:  # as transformers' forward: positions continue from the cache (generation passes them)
            position_ids = jnp.broadcast_to(jax.lax.broadcasted_iota(jnp.int32, (1, T), 1) + P, (B, T))
        freqs = position_ids[..., None].astype(jnp.float32) * self.inv_freq[...]  # (B, T, D/2)
        emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None]  # (B, T, 1, D)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        mask = decoder_mask(attention_mask, T, self.config.sliding_window)
        x = self.embed(input_ids)  # (B, T, C)
        hidden_states, attentions, presents = [x], [], []
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values is not None else None
            x, present, probs = layer(x, cos, sin, mask, past, output_attentions)
            hidden_states.append(x)
            attentions.append(probs)
            presents.append(present)
        x = self.norm(x)
        hidden_states[-1] = x  # transformers reports the final hidden state after the norm
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = x @ head[...].T  # (B, T, V)
        out = {"logits": logits, "present_key_values": tuple(presents)}
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        if output_attentions:
            out["attentions"] = tuple(attentions)
        return out
