"""GPT-2 in PyTorch: learned position embeddings, pre-norm LayerNorm blocks, fused q/k/v projection, GELU MLP, a KV
cache, and the LM head tied to the token embedding. Readable top to bottom; parameter names are kiln's own,
``weights.py`` maps them (and transposes GPT-2's Conv1D weights into nn.Linear's layout).

Shapes: B batch, T new tokens, P cached tokens, S = P + T, C hidden, H heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.graphs.attention import cached_attention, head_mask_per_layer, mask_heads
from kiln.graphs.checkpoint import SavePretrainedMixin
from kiln.graphs.vocab import TokenEmbeddingsMixin
from kiln.graphs.gpt2.config import ACTIVATIONS, GPT2Config
from kiln.graphs.llama.model_torch import decoder_mask  # causal + padding mask, all-masked rows fixed

ACTIVATION_FUNCTIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"; exported as one Gelu node
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer: int, attn_impl: str):
        super().__init__()
        self.H, self.D, self.attn_impl = config.num_attention_heads, config.head_dim, attn_impl
        self.scale = config.attention_scale(layer)
        C = config.hidden_size
        self.qkv = nn.Linear(C, 3 * C)  # GPT-2's c_attn: q, k and v side by side along the output
        self.o = nn.Linear(C, C)

    def forward(self, x, mask, past=None, return_probs=False, head_mask=None):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.H, self.D).transpose(1, 2) for t in self.qkv(x).split(C, dim=-1))  # (B, H, T, D)
        y, present, probs = cached_attention(q, k, v, mask, past, scale=self.scale, impl=self.attn_impl,
                                             return_probs=return_probs)
        y, probs = mask_heads(y, probs, head_mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, H*D)
        return self.o(y), tuple(present), probs


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATION_FUNCTIONS[ACTIVATIONS[config.activation_function]]

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config, layer: int, attn_impl: str):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer, attn_impl)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, mask, past=None, return_probs=False, head_mask=None):
        a, present, probs = self.attn(self.attn_norm(x), mask, past, return_probs, head_mask)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), present, probs


class GPT2LMHeadModel(SavePretrainedMixin, TokenEmbeddingsMixin, nn.Module):
    """Returns ``logits`` (B, T, V) and ``present_key_values`` (per layer (key, value), each (B, H, S, D)); with
    ``output_hidden_states`` / ``output_attentions`` also ``hidden_states`` and ``attentions``."""

    task = "text-generation"
    token_tables = {"input": "embed", "output": "lm_head"}  # lm_head None: tied to the embedding

    def __init__(self, config: GPT2Config, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_embed = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, attn_impl) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                output_hidden_states=False, output_attentions=False, head_mask=None):
        B, T = input_ids.shape
        head_mask = head_mask_per_layer(head_mask, len(self.layers), self.config.num_attention_heads)
        P = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:  # as transformers' forward: positions continue from the cache (generation passes them)
            position_ids = torch.arange(P, P + T, device=input_ids.device)[None].expand(B, T)
        mask = decoder_mask(attention_mask, T)  # (B, 1, T, S)
        x = self.embed(input_ids) + self.pos_embed(position_ids)  # (B, T, C)
        hidden_states, attentions, presents = [x], [], []
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values is not None else None
            x, present, probs = layer(x, mask, past, output_attentions, None if head_mask is None else head_mask[i])
            hidden_states.append(x)
            attentions.append(probs)
            presents.append(present)
        x = self.norm(x)
        hidden_states[-1] = x  # transformers reports the final hidden state after ln_f
        logits = F.linear(x, self.embed.weight if self.lm_head is None else self.lm_head.weight)  # (B, T, V)
        out = {"logits": logits, "present_key_values": tuple(presents)}
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        if output_attentions:
            out["attentions"] = tuple(attentions)
        return out
