"""ModernBERT in PyTorch, readable top to bottom: pre-norm layers, RoPE with a global and a local base, global layers
interleaved with local (sliding-window) ones, a GeGLU MLP, LayerNorms without biases by default.

Parameter names are kiln's own (``layers.0.attn.qkv``); ``weights.py`` maps them to and from the Hugging Face keys.
Shapes: B batch, T sequence, C hidden, H heads, D head dim, I intermediate, V vocabulary.

transformers unpads the batch for flash attention; its eager and SDPA paths, which this follows, keep the padding and
mask it. A local layer is the same attention with a band in its mask, so every layer stays one fused node. Padding
queries whose window holds no real token are the one place kiln differs from transformers (``encoder_masks``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.errors import ConfigError
from kiln.graphs.attention import attention
from kiln.graphs.bert.model_torch import ACT
from kiln.graphs.checkpoint import SavePretrainedMixin
from kiln.graphs.llama.model_torch import apply_rope
from kiln.graphs.modernbert.config import LAYER_TYPES, ModernBertConfig
from kiln.graphs.vocab import TokenEmbeddingsMixin


def layer_norm(config: ModernBertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


class Embeddings(nn.Module):
    """Token embeddings and a norm: positions enter through RoPE in each layer."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = layer_norm(config)

    def forward(self, input_ids):
        return self.norm(self.word(input_ids))  # (B, T, C)


class Attention(nn.Module):
    def __init__(self, config: ModernBertConfig, attn_impl: str):
        super().__init__()
        self.H, self.D, self.attn_impl = config.num_attention_heads, config.head_dim, attn_impl
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.o = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x, cos, sin, mask, return_probs=False):
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.H, self.D)  # (B, T, 3, H, D): q, k, v stacked
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # (B, H, T, D) each
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y, probs = attention(q, k, v, mask=mask, impl=self.attn_impl, return_probs=return_probs)
        y = y.transpose(1, 2).reshape(B, T, self.H * self.D)  # (B, T, C)
        return self.o(y), probs


class MLP(nn.Module):
    """GeGLU: down(act(input) * gate), input and gate from one projection (transformers' Wi)."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACT[config.hidden_activation]

    def forward(self, x):
        value, gate = self.up(x).chunk(2, dim=-1)  # (B, T, I) each
        return self.down(self.act(value) * gate)


class Layer(nn.Module):
    """Pre-norm block. The first layer reads the embeddings' norm, so it has no attention norm of its own."""

    def __init__(self, config: ModernBertConfig, attn_impl: str, layer: int):
        super().__init__()
        self.attn_norm = layer_norm(config) if layer else nn.Identity()
        self.attn = Attention(config, attn_impl)
        self.mlp_norm = layer_norm(config)
        self.mlp = MLP(config)
        self.layer_type = config.layer_types[layer]

    def forward(self, x, cos, sin, mask, return_probs=False):
        a, probs = self.attn(self.attn_norm(x), cos, sin, mask, return_probs)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), probs


def encoder_masks(attention_mask, window: int) -> dict:
    """(B, T) padding mask -> bool (B, 1, T, T) masks per layer type, True = attend. A global layer sees every real
    token; a local one those within ``window`` positions on either side (transformers' bidirectional sliding window,
    |i - j| <= local_attention // 2). Expanded over the query axis because onnxruntime's Attention kernel does not
    broadcast the mask's query dimension.

    A padding query farther than the window from every real token has no key left. transformers leaves that row
    fully masked, and its eager path then averages the values while SDPA returns zeros; a backend that adds -inf may
    even give NaN, which the next layer would spread to real tokens through the scores. Such rows attend to every key
    instead: what they hold is padding either way (no real token reads it), and now every backend computes the same
    finite value. Real tokens' outputs are transformers' exactly."""
    B, T = attention_mask.shape
    keys = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)
    position = torch.arange(T, device=attention_mask.device)
    band = (position[:, None] - position[None, :]).abs() <= window  # (T, T)
    masks = {"full_attention": keys.expand(B, 1, T, T), "sliding_attention": keys & band}  # (B, 1, T, T) each
    return {kind: mask | ~mask.any(dim=-1, keepdim=True) for kind, mask in masks.items()}


class ModernBertModel(SavePretrainedMixin, TokenEmbeddingsMixin, nn.Module):
    """The encoder. Returns a dict with ``last_hidden_state`` (after the final norm) and optionally ``hidden_states``
    (embeddings + each layer, the last one normed, as transformers reports them) and ``attentions``."""

    task = "feature-extraction"
    token_tables = {"input": "embeddings.word"}

    def __init__(self, config: ModernBertConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, attn_impl, i) for i in range(config.num_hidden_layers))
        self.final_norm = layer_norm(config)
        D = config.head_dim
        for layer_type in LAYER_TYPES:  # RoPE frequencies per layer type: global and local layers have their own base
            inv_freq = 1.0 / config.rope_theta[layer_type] ** (torch.arange(0, D, 2, dtype=torch.float) / D)  # (D/2,)
            self.register_buffer(f"{layer_type}_inv_freq", inv_freq, persistent=False)

    def rope(self, position_ids, layer_type: str):
        """cos, sin (B|1, 1, T, D) for ``layer_type``'s base."""
        freqs = position_ids[:, :, None].float() * getattr(self, f"{layer_type}_inv_freq")  # (B|1, T, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B|1, 1, T, D)
        return emb.cos(), emb.sin()

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False,
                output_attentions=False):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, T)
        masks = encoder_masks(attention_mask, self.config.sliding_window)
        ropes = {layer_type: self.rope(position_ids, layer_type) for layer_type in LAYER_TYPES}
        x = self.embeddings(input_ids)
        hidden_states, attentions = [x], []
        for layer in self.layers:
            x, probs = layer(x, *ropes[layer.layer_type], masks[layer.layer_type], output_attentions)
            hidden_states.append(x)
            attentions.append(probs)
        x = self.final_norm(x)
        hidden_states[-1] = x  # transformers reports the last hidden state after the final norm
        out = {"last_hidden_state": x}
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        if output_attentions:
            out["attentions"] = tuple(attentions)
        return out


class PredictionHead(nn.Module):
    """dense + activation + norm, before every head's projection (transformers' ModernBertPredictionHead)."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.act = ACT[config.classifier_activation]
        self.norm = layer_norm(config)

    def forward(self, x):
        return self.norm(self.act(self.dense(x)))


class TiedDecoder(nn.Module):
    """The masked-LM decoder when its weight is the token embedding matrix: only its bias is its own."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(config.vocab_size)) if config.decoder_bias else None


class _TaskModel(SavePretrainedMixin, TokenEmbeddingsMixin, nn.Module):
    """The encoder (``self.model``, as transformers nests it) plus the prediction head and one task projection;
    returns a dict like transformers."""

    token_tables = {"input": "model.embeddings.word"}

    def __init__(self, config: ModernBertConfig, attn_impl: str):
        super().__init__()
        self.config = config
        self.model = ModernBertModel(config, attn_impl=attn_impl)
        self.head = PredictionHead(config)

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False,
                output_attentions=False):
        out = self.model(input_ids, attention_mask, position_ids, output_hidden_states, output_attentions)
        result = self.task_head(out["last_hidden_state"], attention_mask)
        result.update({k: out[k] for k in ("hidden_states", "attentions") if k in out})
        return result


class ModernBertForMaskedLM(_TaskModel):
    """Vocabulary logits (B, T, V) at every position."""

    task = "fill-mask"

    def __init__(self, config: ModernBertConfig, attn_impl: str = "sdpa"):
        super().__init__(config, attn_impl)
        if config.tie_word_embeddings:
            self.decoder = TiedDecoder(config)
            self.token_tables = {**self.token_tables, **({"bias": "decoder.bias"} if config.decoder_bias else {})}
        else:
            self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
            self.token_tables = {**self.token_tables, "output": "decoder"}

    def task_head(self, x, attention_mask):
        weight = self.model.embeddings.word.weight if self.config.tie_word_embeddings else self.decoder.weight
        return {"logits": F.linear(self.head(x), weight, self.decoder.bias)}  # (B, T, V)


class ModernBertForSequenceClassification(_TaskModel):
    """Logits (B, num_labels) from the first token or the mean of the real tokens (``classifier_pooling``). What the
    scores mean (softmax, sigmoid, raw) follows ``config.problem_type``."""

    task = "text-classification"

    def __init__(self, config: ModernBertConfig, attn_impl: str = "sdpa"):
        super().__init__(config, attn_impl)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)  # always with a bias, as transformers

    def task_head(self, x, attention_mask):
        if self.config.classifier_pooling == "cls":
            pooled = x[:, 0]  # (B, C)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
            weights = attention_mask[:, :, None].to(x.dtype)  # (B, T, 1)
            pooled = (x * weights).sum(dim=1) / weights.sum(dim=1)  # (B, C)
        return {"logits": self.classifier(self.head(pooled))}


class ModernBertForTokenClassification(_TaskModel):
    """Per-token logits (B, T, num_labels)."""

    task = "token-classification"

    def __init__(self, config: ModernBertConfig, attn_impl: str = "sdpa"):
        super().__init__(config, attn_impl)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def task_head(self, x, attention_mask):
        return {"logits": self.classifier(self.head(x))}


class ModernBertForQuestionAnswering(_TaskModel):
    """Start and end logits (B, T) of the answer span."""

    task = "question-answering"

    def __init__(self, config: ModernBertConfig, attn_impl: str = "sdpa"):
        if config.num_labels != 2:  # transformers splits the classifier's outputs into exactly start and end
            raise ConfigError(f"Question answering needs 2 labels (start and end), but config.json has "
                              f"{config.num_labels} ('num_labels' / 'id2label').")
        super().__init__(config, attn_impl)
        self.classifier = nn.Linear(config.hidden_size, 2)

    def task_head(self, x, attention_mask):
        start, end = self.classifier(self.head(x)).unbind(-1)  # (B, T) each
        return {"start_logits": start, "end_logits": end}
