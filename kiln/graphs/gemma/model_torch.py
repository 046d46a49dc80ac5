"""Gemma family in PyTorch (Gemma 2, Gemma 3 text): the LLaMA-family decoder with Gemma's changes, each marked where
it happens: embeddings scaled by sqrt(C), RMSNorm by (1 + weight) in float32, four norms per layer, GeGLU with tanh
GELU, attention scaled by query_pre_attn_scalar, attention and final logits soft-capped (Gemma 2), local layers with a
sliding window and their own RoPE (Gemma 3), per-head q/k norms (Gemma 3), tied embeddings.

Shapes: B batch, T new tokens, P cached tokens, S = P + T, C hidden, H query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.errors import InputError
from kiln.graphs.attention import attention_kv, eager, head_mask_per_layer, mask_heads
from kiln.graphs.checkpoint import SavePretrainedMixin
from kiln.graphs.gemma.config import GemmaConfig
from kiln.graphs.heads import PruneHeadsMixin
from kiln.graphs.llama.model_torch import Attention as LlamaAttention
from kiln.graphs.llama.model_torch import apply_rope, decoder_mask
from kiln.graphs.vocab import TokenEmbeddingsMixin


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), computed in float32 and cast back (the weight starts at zero)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        y = F.rms_norm(x.float(), (x.shape[-1],), 1.0 + self.weight.float(), self.eps)  # one RMSNormalization node
        return y.to(x.dtype)


class Attention(LlamaAttention):
    """The LLaMA family's projections and pruning; Gemma's scale, soft-capping and (1 + w) q/k norms."""

    def __init__(self, config: GemmaConfig, attn_impl: str, layer: int = 0):
        super().__init__(config, attn_impl, layer)
        if config.qk_norm:  # Gemma 3: as Qwen3's, with Gemma's norm
            self.q_norm, self.k_norm = RMSNorm(self.D, config.rms_norm_eps), RMSNorm(self.D, config.rms_norm_eps)
        self.scale = config.query_pre_attn_scalar ** -0.5  # not 1 / sqrt(D)
        self.softcap = config.attention_softcap
        self.cache_window = config.cache_window(layer)  # a local layer's cache: the window, not the context

    # Copied from graphs.llama.model_torch.Attention.forward, with the empty past, Gemma's scale, soft-cap and the
    # window-bounded present
    def forward(self, x, cos, sin, mask, past=None, return_probs=False, head_mask=None):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.H, self.D)  # (B, T, H, D)
        k = self.k(x).view(B, T, self.Hkv, self.D)  # (B, T, Hkv, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        v = self.v(x).view(B, T, self.Hkv, self.D).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is None:  # no cache: an empty one, so that every call is the one exported op
            past = (k[:, :, :0], v[:, :, :0])
        if return_probs:  # the readable eager math; not a single exported node
            k_all, v_all = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            y, probs = eager(q, k_all, v_all, mask, self.scale, causal=False, softcap=self.softcap)
            present = (k_all, v_all)
        else:  # one op -> one ONNX Attention node with past/present (and softcap)
            y, *present = attention_kv(q, k, v, mask, past[0], past[1], self.scale, self.softcap)
            probs = None
        if self.cache_window is not None:  # (B, Hkv, min(P + T, W - 1), D): what the next step's queries can see
            present = [p[:, :, -self.cache_window:] if self.cache_window else p[:, :, p.shape[2]:] for p in present]
        y, probs = mask_heads(y, probs, head_mask)
        y = y.transpose(1, 2).reshape(B, T, self.H * self.D)  # (B, T, H*D)
        return self.o(y), tuple(present), probs


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))


class Layer(nn.Module):
    """Pre- and post-norm around both the attention and the MLP (four norms)."""

    def __init__(self, config: GemmaConfig, attn_impl: str, layer: int = 0):
        super().__init__()
        eps = config.rms_norm_eps
        self.sliding = config.sliding(layer)
        self.attn_norm, self.post_attn_norm = RMSNorm(config.hidden_size, eps), RMSNorm(config.hidden_size, eps)
        self.attn = Attention(config, attn_impl, layer)
        self.mlp_norm, self.post_mlp_norm = RMSNorm(config.hidden_size, eps), RMSNorm(config.hidden_size, eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, past=None, return_probs=False, head_mask=None):
        a, present, probs = self.attn(self.attn_norm(x), cos, sin, mask, past, return_probs, head_mask)
        x = x + self.post_attn_norm(a)
        return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x))), present, probs


class GemmaForCausalLM(SavePretrainedMixin, TokenEmbeddingsMixin, PruneHeadsMixin, nn.Module):
    """Returns ``logits`` (B, T, V) and ``present_key_values`` (per layer (key, value), each (B, Hkv, S, D), S = P +
    T for a global layer and at most ``sliding_window - 1`` for a local one: its cache is bounded by the window, as
    transformers' is); with ``output_hidden_states`` / ``output_attentions`` also ``hidden_states`` and
    ``attentions``. ``attention_mask`` (B, P + T) covers the whole context; a local layer reads its last keys'."""

    task = "text-generation"
    token_tables = {"input": "embed", "output": "lm_head"}  # lm_head None: tied to the embedding

    def __init__(self, config: GemmaConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, attn_impl, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.from_numpy(config.inverse_frequencies()), persistent=False)
        self.register_buffer("local_inv_freq", torch.from_numpy(config.inverse_frequencies(config.local_rope)),
                             persistent=False)

    def attention_modules(self) -> list:
        return [layer.attn for layer in self.layers]

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                output_hidden_states=False, output_attentions=False, head_mask=None):
        B, T = input_ids.shape
        head_mask = head_mask_per_layer(head_mask, len(self.layers), self.config.num_attention_heads,
                                        pruned=bool(self.config.pruned_heads))
        local = [i for i, layer in enumerate(self.layers) if layer.attn.cache_window is not None]
        # P: the whole context's past, which only a global layer's cache (or the mask) spans
        whole = next((i for i in range(len(self.layers)) if i not in local), None)
        if past_key_values is None:
            P = 0
        elif attention_mask is not None:
            P = attention_mask.shape[1] - T
        elif whole is not None:
            P = past_key_values[whole][0].shape[2]
        else:
            raise InputError("Every layer of this model is local, so its cache does not tell how long the context "
                             "is: pass attention_mask (batch, past + new tokens).")
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:  # as transformers' forward: positions continue from the cache (generation passes them)
            position_ids = torch.arange(P, P + T, device=input_ids.device)[None].expand(B, T)
        x = self.embed(input_ids)  # (B, T, C)
        x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)  # Gemma: scaled in the model's dtype
        ropes, masks = {}, {}
        for sliding, inv_freq in ((False, self.inv_freq), (True, self.local_inv_freq)):
            if any(layer.sliding == sliding for layer in self.layers):  # only the kinds of layer the model has
                freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, T, D/2)
                emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
                ropes[sliding] = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
                mask = attention_mask
                if sliding and local and past_key_values is not None:  # the local cache holds the last P_l keys
                    kept = past_key_values[local[0]][0].shape[2] + T
                    mask = attention_mask[:, attention_mask.shape[1] - kept:]  # (B, P_l + T)
                masks[sliding] = decoder_mask(mask, T, self.config.sliding_window if sliding else None)
        # Copied from graphs.llama.model_torch.LlamaForCausalLM.forward, with each layer's own RoPE and mask
        hidden_states, attentions, presents = [x], [], []
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values is not None else None
            x, present, probs = layer(x, *ropes[layer.sliding], masks[layer.sliding], past, output_attentions,
                                      None if head_mask is None else head_mask[i])
            hidden_states.append(x)
            attentions.append(probs)
            presents.append(present)
        x = self.norm(x)
        hidden_states[-1] = x  # transformers reports the final hidden state after the norm
        logits = F.linear(x, self.embed.weight if self.lm_head is None else self.lm_head.weight)  # (B, T, V)
        if self.config.final_logit_softcapping:  # Gemma 2: logits capped to (-cap, cap)
            cap = self.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        # Copied from graphs.llama.model_torch.LlamaForCausalLM.forward
        out = {"logits": logits, "present_key_values": tuple(presents)}
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        if output_attentions:
            out["attentions"] = tuple(attentions)
        return out
