"""LLaMA family in keras 3 on the TensorFlow backend: the sibling of ``model_torch.py`` (RMSNorm, RoPE, grouped-query
attention, SwiGLU MLP, a KV cache), same classes, same parameter names and PyTorch layouts, checked against it.

Shapes: B batch, T new tokens, P cached tokens, S = P + T, C hidden, H query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

# layers_tf first: it loads triton before TensorFlow (see there), and hands over tf.
from kiln.graphs.layers_tf import Embedding, Linear, Module, tf  # isort: skip

import math  # noqa: E402

from kiln.graphs.checkpoint import SavePretrainedMixin
from kiln.graphs.llama.config import LlamaConfig


class RMSNorm(Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = self.add_weight(shape=(dim,), initializer="ones", name="weight")
        self.eps = eps

    def call(self, x):
        return x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + self.eps) * self.weight




def rotate_half(x):
    a, b = tf.split(x, 2, axis=-1)
    return tf.concat([-b, a], axis=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin  # x (B, H, T, D); cos/sin (B, 1, T, D)


def attention(q, k, v, mask, scale: float):
    """The eager math of ``kiln.graphs.attention.eager``: q (B, H, T, D), k/v (B, Hkv, S, D), mask bool
    (B, 1, T, S) with True = attend. Returns (out (B, H, T, D), probs (B, H, T, S))."""
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv != H:  # grouped-query attention: each kv head serves H // Hkv query heads
        k = tf.repeat(k, H // Hkv, axis=1)  # (B, H, S, D)
        v = tf.repeat(v, H // Hkv, axis=1)
    scores = tf.matmul(q, k, transpose_b=True) * scale  # (B, H, T, S)
    # finfo.min rather than -inf: a fully masked row then averages v instead of producing NaN, as transformers does.
    scores = tf.where(mask, scores, tf.float32.min)
    probs = tf.nn.softmax(scores, axis=-1)
    return tf.matmul(probs, v), probs


class Attention(Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.H, self.Hkv, self.D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q = Linear(config.hidden_size, self.H * self.D, bias=config.qkv_bias)
        self.k = Linear(config.hidden_size, self.Hkv * self.D, bias=config.qkv_bias)
        self.v = Linear(config.hidden_size, self.Hkv * self.D, bias=config.qkv_bias)
        self.o = Linear(self.H * self.D, config.hidden_size, bias=config.o_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # Qwen3: over D, so before or after the transpose is the same
            self.q_norm, self.k_norm = RMSNorm(self.D, config.rms_norm_eps), RMSNorm(self.D, config.rms_norm_eps)

    def call(self, x, cos, sin, mask, past=None):
        B, T = tf.shape(x)[0], tf.shape(x)[1]
        q = tf.transpose(tf.reshape(self.q(x), (B, T, self.H, self.D)), (0, 2, 1, 3))  # (B, H, T, D)
        k = tf.transpose(tf.reshape(self.k(x), (B, T, self.Hkv, self.D)), (0, 2, 1, 3))  # (B, Hkv, T, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        v = tf.transpose(tf.reshape(self.v(x), (B, T, self.Hkv, self.D)), (0, 2, 1, 3))  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = tf.concat([past[0], k], axis=2)  # (B, Hkv, S, D)
            v = tf.concat([past[1], v], axis=2)
        y, probs = attention(q, k, v, mask, 1.0 / math.sqrt(self.D))
        y = tf.reshape(tf.transpose(y, (0, 2, 1, 3)), (B, T, self.H * self.D))  # (B, T, H*D)
        return self.o(y), (k, v), probs


class MLP(Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate = Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up = Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def call(self, x):
        return self.down(tf.nn.silu(self.gate(x)) * self.up(x))


class Layer(Module):
    """Pre-norm block."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def call(self, x, cos, sin, mask, past=None):
        a, present, probs = self.attn(self.attn_norm(x), cos, sin, mask, past)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), present, probs


def decoder_mask(attention_mask, T, sliding_window: int | None = None):
    """(B, S) padding mask over past + new tokens -> bool (B, 1, T, S): causal (query i sits at P + i), padding,
    and the sliding window. Rows with nothing to attend to (left-padding queries) attend to every key instead: their
    outputs are never used, and an all-masked row would put NaN into the cache."""
    S = tf.shape(attention_mask)[1]
    i = tf.range(T)[:, None] + (S - T)  # (T, 1) absolute position of each query
    j = tf.range(S)[None, :]  # (1, S)
    keep = j <= i  # (T, S)
    if sliding_window is not None:
        keep = keep & (j > i - sliding_window)
    keep = keep[None, None] & tf.not_equal(attention_mask, 0)[:, None, None, :]  # (B, 1, T, S)
    return keep | ~tf.reduce_any(keep, axis=-1, keepdims=True)


class LlamaForCausalLM(SavePretrainedMixin, Module):
    """Returns ``logits`` (B, T, V) and ``present_key_values`` (per layer (key, value), each (B, Hkv, S, D)); with
    ``output_hidden_states`` / ``output_attentions`` also ``hidden_states`` and ``attentions``. Inputs are NumPy
    arrays or tf tensors; ``past_key_values`` a list of (key, value) pairs (B, Hkv, P, D). ``attn_impl`` is accepted
    for the torch signature and ignored: TensorFlow has one attention here, the eager math."""

    task = "text-generation"

    def __init__(self, config: LlamaConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = config
        self.embed = Embedding(config.vocab_size, config.hidden_size)
        self.layers = [Layer(config) for _ in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, bias=False)
        self.inv_freq = config.inverse_frequencies()  # a constant, not a weight (torch: a non-persistent buffer)

    def call(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
             output_hidden_states=False, output_attentions=False):
        B, T = tf.shape(input_ids)[0], tf.shape(input_ids)[1]
        P = tf.shape(past_key_values[0][0])[2] if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = tf.ones((B, P + T), dtype=tf.int64)
        if position_ids is None:  # as transformers' forward: positions continue from the cache (generation passes them)
            position_ids = tf.broadcast_to(tf.range(P, P + T)[None], (B, T))
        freqs = tf.cast(position_ids, tf.float32)[:, :, None] * self.inv_freq[None, None, :]  # (B, T, D/2)
        emb = tf.concat([freqs, freqs], axis=-1)[:, None]  # (B, 1, T, D)
        cos, sin = tf.cos(emb), tf.sin(emb)
        mask = decoder_mask(attention_mask, T, self.config.sliding_window)
        x = self.embed(input_ids)  # (B, T, C)
        hidden_states, attentions, presents = [x], [], []
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values is not None else None
            x, present, probs = layer(x, cos, sin, mask, past)
            hidden_states.append(x)
            attentions.append(probs)
            presents.append(present)
        x = self.norm(x)
        hidden_states[-1] = x  # transformers reports the final hidden state after the norm
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = tf.matmul(x, head, transpose_b=True)  # (B, T, V)
        out = {"logits": logits, "present_key_values": tuple(presents)}
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        if output_attentions:
            out["attentions"] = tuple(attentions)
        return out
