"""LLaMA family in PyTorch (Llama, Mistral, Qwen2, Qwen3, SmolLM): RMSNorm, RoPE, grouped-query attention, SwiGLU
MLP, a KV cache. Readable top to bottom; parameter names are kiln's own, ``weights.py`` maps them.

Shapes: B batch, T new tokens, P cached tokens, S = P + T, C hidden, H query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.graphs.attention import cached_attention, head_mask_per_layer, mask_heads
from kiln.graphs.checkpoint import SavePretrainedMixin
from kiln.graphs.heads import PruneHeadsMixin, head_rows, prune_linear
from kiln.graphs.vocab import TokenEmbeddingsMixin
from kiln.graphs.llama.config import LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # exported as one RMSNormalization node


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x, cos, sin):
    """x (B, H, T, D); cos/sin (B, 1, T, R): R = D rotates the whole head, R < D (Phi-4-mini's
    partial_rotary_factor) its first R dimensions, the rest passing through."""
    R = cos.shape[-1]
    if R == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rotated, rest = x[..., :R], x[..., R:]
    return torch.cat([rotated * cos + rotate_half(rotated) * sin, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, attn_impl: str, layer: int = 0):
        super().__init__()
        # A pruned layer has fewer heads (config.pruned_heads: whole groups, so H / Hkv stays the group size).
        self.H, self.Hkv = config.heads_in_layer(layer), config.kv_heads_in_layer(layer)
        self.D, self.attn_impl = config.head_dim, attn_impl
        self.q = nn.Linear(config.hidden_size, self.H * self.D, bias=config.qkv_bias)
        self.k = nn.Linear(config.hidden_size, self.Hkv * self.D, bias=config.qkv_bias)
        self.v = nn.Linear(config.hidden_size, self.Hkv * self.D, bias=config.qkv_bias)
        self.o = nn.Linear(self.H * self.D, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:  # Qwen3: every query and key head normalised over D (one weight shared by the heads)
            self.q_norm, self.k_norm = RMSNorm(self.D, config.rms_norm_eps), RMSNorm(self.D, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def prune(self, heads: list[int]) -> None:
        """Remove query ``heads`` (indices among this layer's current heads, whole groups) and their key/value heads."""
        group = self.H // self.Hkv
        keep = [h for h in range(self.H) if h not in heads]
        keep_kv = sorted({h // group for h in keep})
        q_rows, kv_rows = head_rows(keep, self.D), head_rows(keep_kv, self.D)
        self.q = prune_linear(self.q, q_rows, 0)
        self.k, self.v = prune_linear(self.k, kv_rows, 0), prune_linear(self.v, kv_rows, 0)
        self.o = prune_linear(self.o, q_rows, 1)
        self.H, self.Hkv = len(keep), len(keep_kv)

    def forward(self, x, cos, sin, mask, past=None, return_probs=False, head_mask=None):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.H, self.D)  # (B, T, H, D)
        k = self.k(x).view(B, T, self.Hkv, self.D)  # (B, T, Hkv, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        v = self.v(x).view(B, T, self.Hkv, self.D).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scale = 1.0 / math.sqrt(self.D)
        y, present, probs = cached_attention(q, k, v, mask, past, scale=scale, impl=self.attn_impl,
                                             return_probs=return_probs)
        y, probs = mask_heads(y, probs, head_mask)
        y = y.transpose(1, 2).reshape(B, T, self.H * self.D)  # (B, T, H*D)
        return self.o(y), tuple(present), probs


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Layer(nn.Module):
    """Pre-norm block."""

    def __init__(self, config: LlamaConfig, attn_impl: str, layer: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, attn_impl, layer)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, past=None, return_probs=False, head_mask=None):
        a, present, probs = self.attn(self.attn_norm(x), cos, sin, mask, past, return_probs, head_mask)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), present, probs


def decoder_mask(attention_mask, T: int, sliding_window: int | None = None):
    """(B, S) padding mask over past + new tokens -> bool (B, 1, T, S): causal (query i sits at P + i), padding,
    and the sliding window. Rows with nothing to attend to (left-padding queries) attend to every key instead: their
    outputs are never used, and an all-masked row would put NaN into the cache."""
    B, S = attention_mask.shape
    keep = torch.ones(T, S, dtype=torch.bool, device=attention_mask.device).tril(diagonal=S - T)  # (T, S)
    if sliding_window is not None:
        keep = keep & ~torch.ones_like(keep).tril(diagonal=S - T - sliding_window)
    keep = keep[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
    return keep | ~keep.any(dim=-1, keepdim=True)


class LlamaForCausalLM(SavePretrainedMixin, TokenEmbeddingsMixin, PruneHeadsMixin, nn.Module):
    """Returns ``logits`` (B, T, V) and ``present_key_values`` (per layer (key, value), each (B, Hkv, S, D)); with
    ``output_hidden_states`` / ``output_attentions`` also ``hidden_states`` and ``attentions``."""

    task = "text-generation"
    token_tables = {"input": "embed", "output": "lm_head"}  # lm_head None: tied to the embedding

    def __init__(self, config: LlamaConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, attn_impl, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.from_numpy(config.inverse_frequencies()), persistent=False)
        long = config.long_inverse_frequencies()  # LongRoPE (Phi-3): the frequencies past the original context
        self.register_buffer("long_inv_freq", None if long is None else torch.from_numpy(long), persistent=False)

    def attention_modules(self) -> list:
        return [layer.attn for layer in self.layers]

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                output_hidden_states=False, output_attentions=False, head_mask=None):
        B, T = input_ids.shape
        head_mask = head_mask_per_layer(head_mask, len(self.layers), self.config.num_attention_heads,
                                        pruned=bool(self.config.pruned_heads))
        P = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:  # as transformers' forward: positions continue from the cache (generation passes them)
            position_ids = torch.arange(P, P + T, device=input_ids.device)[None].expand(B, T)
        inv_freq = self.inv_freq[None, None, :]  # (1, 1, R/2)
        if self.long_inv_freq is not None:  # LongRoPE, as transformers runs one sequence: the long factors for every
            # position of a call whose last position passes the original context (cached keys keep theirs). Per row,
            # so that a batch gives each row what it alone would get (transformers' batches take the batch's max).
            longer = position_ids.max(dim=-1, keepdim=True).values + 1 > self.config.rope["original_max_position_embeddings"]
            inv_freq = torch.where(longer[:, :, None], self.long_inv_freq, self.inv_freq)  # (B, 1, R/2)
        freqs = position_ids[:, :, None].float() * inv_freq  # (B, T, R/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, R), R = D unless partial_rotary_factor < 1
        x = self.embed(input_ids)  # (B, T, C)
        # Angles in fp32 (positions up to the context length need it), applied in the model's dtype as transformers
        # does: fp32 cos/sin would promote a half-precision q/k to fp32 while v stays half.
        cos, sin = emb.cos(), emb.sin()
        if self.config.rope_attention_factor != 1.0:  # LongRoPE scales both
            cos, sin = cos * self.config.rope_attention_factor, sin * self.config.rope_attention_factor
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        mask = decoder_mask(attention_mask, T, self.config.sliding_window)
        hidden_states, attentions, presents = [x], [], []
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values is not None else None
            x, present, probs = layer(x, cos, sin, mask, past, output_attentions,
                                      None if head_mask is None else head_mask[i])
            hidden_states.append(x)
            attentions.append(probs)
            presents.append(present)
        x = self.norm(x)
        hidden_states[-1] = x  # transformers reports the final hidden state after the norm
        logits = F.linear(x, self.embed.weight if self.lm_head is None else self.lm_head.weight)  # (B, T, V)
        out = {"logits": logits, "present_key_values": tuple(presents)}
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        if output_attentions:
            out["attentions"] = tuple(attentions)
        return out
