"""DeBERTa-v2 and DeBERTa-v3 in PyTorch, readable top to bottom.

DeBERTa's attention is disentangled: besides the content score q_i . k_j, a query reads the relative position of the
key (content-to-position, q_i . Pk[i - j]) and a key reads the relative position of the query (position-to-content,
k_j . Pq[i - j]), with relative distances in log buckets beyond a range (v3) and the position projections shared
with the content ones (v3: ``share_att_key``). The relative terms depend on q and k but not on the softmax, so they
are computed first, as an additive bias that the fused attention node takes with the padding mask folded in: the
exported graph keeps ONE Attention node per layer. Everything else is BERT's post-norm encoder; v3 drops absolute
positions from the input (``position_biased_input: false``).

Parameter names are kiln's own; ``weights.py`` maps them to and from the Hugging Face keys.
Shapes: B batch, T sequence, C hidden, E embedding width, H heads, D head dim, R = 2 x relative span.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.errors import ConfigError
from kiln.graphs.attention import attention, head_mask_per_layer, mask_heads
from kiln.graphs.bert.model_torch import ACT
from kiln.graphs.checkpoint import SavePretrainedMixin
from kiln.graphs.deberta_v2.config import DebertaV2Config
from kiln.graphs.vocab import TokenEmbeddingsMixin


def log_buckets(relative: torch.Tensor, buckets: int, max_position: int) -> torch.Tensor:
    """Relative distances kept exact within buckets // 2 and logarithmic beyond, up to ``max_position``: transformers'
    ``make_log_bucket_position``, the same float32 operations so that every bucket boundary falls where it does."""
    sign = torch.sign(relative)
    mid = buckets // 2
    near = (relative < mid) & (relative > -mid)
    distance = torch.where(near, torch.tensor(mid - 1).type_as(relative), relative.abs())
    log_pos = torch.ceil(torch.log(distance / mid) / torch.log(torch.tensor((max_position - 1) / mid))
                         * (mid - 1)) + mid
    return torch.where(distance <= mid, relative.type_as(log_pos), log_pos * sign).long()


def relative_positions(T: int, config: DebertaV2Config, device) -> torch.Tensor:
    """(T, T) query position minus key position, bucketed where the config says so."""
    ids = torch.arange(T, device=device)
    relative = ids[:, None] - ids[None, :]
    if config.position_buckets > 0:
        relative = log_buckets(relative, config.position_buckets, config.relative_positions)
    return relative


class Embeddings(nn.Module):
    def __init__(self, config: DebertaV2Config):
        super().__init__()
        E = config.embedding_width
        self.word = nn.Embedding(config.vocab_size, E)
        self.position = nn.Embedding(config.max_position_embeddings, E) if config.position_biased_input else None
        self.token_type = nn.Embedding(config.type_vocab_size, E) if config.type_vocab_size else None
        self.proj = nn.Linear(E, config.hidden_size, bias=False) if E != config.hidden_size else None
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids, token_type_ids, position_ids, attention_mask):
        x = self.word(input_ids)  # (B, T, E)
        if self.position is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
            x = x + self.position(position_ids)
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        if self.proj is not None:
            x = self.proj(x)  # (B, T, C)
        return self.norm(x) * attention_mask[..., None].to(x.dtype)  # padding positions start at zero


class DisentangledAttention(nn.Module):
    def __init__(self, config: DebertaV2Config, attn_impl: str):
        super().__init__()
        self.config, self.attn_impl = config, attn_impl
        self.n_head, self.head_dim = config.num_attention_heads, config.head_dim
        width = self.n_head * self.head_dim
        self.q = nn.Linear(config.hidden_size, width)
        self.k = nn.Linear(config.hidden_size, width)
        self.v = nn.Linear(config.hidden_size, width)
        terms = config.pos_att_type if config.relative_attention else ()
        self.c2p, self.p2c = "c2p" in terms, "p2c" in terms
        # v3 reads relative embeddings through the content projections; v2 has its own.
        separate = config.relative_attention and not config.share_att_key
        self.pos_k = nn.Linear(config.hidden_size, width) if separate and self.c2p else None
        self.pos_q = nn.Linear(config.hidden_size, width) if separate and self.p2c else None
        self.o = nn.Linear(width, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.scale = 1.0 / math.sqrt(self.head_dim * config.score_scale)

    def heads(self, x):  # (..., T, H*D) -> (..., H, T, D)
        return x.unflatten(-1, (self.n_head, self.head_dim)).transpose(-2, -3)

    def relative_bias(self, q, k, rel_embeddings, relative):
        """The content-to-position and position-to-content scores (B, H, T, T), already scaled."""
        span = self.config.relative_span
        B, H, T, _ = q.shape
        bias = q.new_zeros(())
        if self.c2p:
            pos_k = self.heads((self.pos_k or self.k)(rel_embeddings))  # (H, R, D)
            scores = q @ pos_k.transpose(-1, -2)  # (B, H, T, R): each query against every relative position
            index = (relative + span).clamp(0, 2 * span - 1)  # (T, T): query i, key j -> position of i - j
            bias = bias + torch.gather(scores, -1, index.expand(B, H, T, T)) * self.scale
        if self.p2c:
            pos_q = self.heads((self.pos_q or self.q)(rel_embeddings))  # (H, R, D)
            scores = k @ pos_q.transpose(-1, -2)  # (B, H, T, R): each key against every relative position
            index = (span - relative).clamp(0, 2 * span - 1)  # (T, T): key i, query j -> position of j - i
            bias = bias + torch.gather(scores, -1, index.expand(B, H, T, T)).transpose(-1, -2) * self.scale
        return bias

    def forward(self, x, mask, rel_embeddings, relative, return_probs=False, head_mask=None):
        q, k, v = (self.heads(proj(x)) for proj in (self.q, self.k, self.v))  # (B, H, T, D) each
        if self.c2p or self.p2c:
            # Additive float mask: the relative scores, and the float minimum where the bool mask says no (as
            # transformers' masked_fill).
            mask = self.relative_bias(q, k, rel_embeddings, relative).masked_fill(~mask, torch.finfo(q.dtype).min)
        y, probs = attention(q, k, v, mask=mask, scale=self.scale, impl=self.attn_impl, return_probs=return_probs)
        y, probs = mask_heads(y, probs, head_mask)
        y = y.transpose(1, 2).flatten(2)  # (B, T, H*D)
        return self.norm(x + self.o(y)), probs


class Layer(nn.Module):
    """Post-norm block: disentangled attention, then the feed-forward, each with its residual and LayerNorm."""

    def __init__(self, config: DebertaV2Config, attn_impl: str):
        super().__init__()
        self.attn = DisentangledAttention(config, attn_impl)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = ACT[config.hidden_act]

    def forward(self, x, mask, rel_embeddings, relative, return_probs=False, head_mask=None):
        x, probs = self.attn(x, mask, rel_embeddings, relative, return_probs, head_mask)
        return self.mlp_norm(x + self.down(self.act(self.up(x)))), probs


class ConvLayer(nn.Module):
    """DeBERTa-v2 xlarge/xxlarge: a 1-D convolution over the embeddings added to the first layer's output."""

    def __init__(self, config: DebertaV2Config):
        super().__init__()
        size = config.conv_kernel_size
        self.conv = nn.Conv1d(config.hidden_size, config.hidden_size, size, padding=(size - 1) // 2,
                              groups=config.conv_groups)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = ACT[config.conv_act]

    def forward(self, embeddings, layer_out, attention_mask):
        keep = attention_mask[..., None].to(embeddings.dtype)  # (B, T, 1)
        out = self.conv(embeddings.transpose(1, 2)).transpose(1, 2) * keep  # (B, T, C)
        return self.norm(layer_out + self.act(out)) * keep


class DebertaV2Model(SavePretrainedMixin, TokenEmbeddingsMixin, nn.Module):
    """The encoder. Returns a dict with ``last_hidden_state`` and optionally ``hidden_states`` (embeddings + each
    layer) and ``attentions`` (each layer's probabilities)."""

    task = "feature-extraction"
    token_tables = {"input": "embeddings.word"}
    pooler = None  # DeBERTa's pooler belongs to its classification head

    def __init__(self, config: DebertaV2Config, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, attn_impl) for _ in range(config.num_hidden_layers))
        relative = config.relative_attention
        self.rel_embeddings = nn.Embedding(2 * config.relative_span, config.hidden_size) if relative else None
        self.rel_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) \
            if relative and config.layer_norm_rel else None
        self.conv = ConvLayer(config) if config.conv_kernel_size else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states=False, output_attentions=False, head_mask=None):
        B, T = input_ids.shape
        head_mask = head_mask_per_layer(head_mask, len(self.layers), self.config.num_attention_heads)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # (B, 1, T, T) bool, True = attend, over keys only. transformers' DeBERTa masks padding queries too, which
        # makes their rows attend nothing: it averages v there, onnxruntime's Attention returns zeros. Either is
        # padding; a padding query attending the real keys instead keeps every row defined in every runtime, and
        # no real position changes.
        mask = attention_mask[:, None, None, :].bool().expand(B, 1, T, T)
        rel_embeddings = relative = None
        if self.rel_embeddings is not None:
            rel_embeddings = self.rel_embeddings.weight  # (R, C)
            if self.rel_norm is not None:
                rel_embeddings = self.rel_norm(rel_embeddings)
            relative = relative_positions(T, self.config, input_ids.device)
        embeddings = x = self.embeddings(input_ids, token_type_ids, position_ids, attention_mask)
        hidden_states, attentions = [x], []
        for i, layer in enumerate(self.layers):
            x, probs = layer(x, mask, rel_embeddings, relative, output_attentions,
                             None if head_mask is None else head_mask[i])
            if i == 0 and self.conv is not None:
                x = self.conv(embeddings, x, attention_mask)
            hidden_states.append(x)
            attentions.append(probs)
        out = {"last_hidden_state": x}
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        if output_attentions:
            out["attentions"] = tuple(attentions)
        return out


class _TaskModel(SavePretrainedMixin, TokenEmbeddingsMixin, nn.Module):
    """The encoder (``self.deberta``) plus one task head; returns a dict like transformers."""

    token_tables = {"input": "deberta.embeddings.word"}

    def __init__(self, config: DebertaV2Config, attn_impl: str):
        super().__init__()
        self.config = config
        self.deberta = DebertaV2Model(config, attn_impl=attn_impl)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states=False, output_attentions=False, head_mask=None):
        out = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                           output_attentions, head_mask)
        result = self.head(out["last_hidden_state"])
        result.update({k: out[k] for k in ("hidden_states", "attentions") if k in out})
        return result


class DebertaV2ForSequenceClassification(_TaskModel):
    """Logits (B, num_labels) from the first token through the context pooler (dense + activation)."""

    task = "text-classification"

    def __init__(self, config: DebertaV2Config, attn_impl: str = "sdpa"):
        super().__init__(config, attn_impl)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.pooler_act = ACT[config.pooler_hidden_act]
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def head(self, x):
        return {"logits": self.classifier(self.pooler_act(self.pooler(x[:, 0])))}


class DebertaV2ForTokenClassification(_TaskModel):
    """Per-token logits (B, T, num_labels)."""

    task = "token-classification"

    def __init__(self, config: DebertaV2Config, attn_impl: str = "sdpa"):
        super().__init__(config, attn_impl)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def head(self, x):
        return {"logits": self.classifier(x)}


class DebertaV2ForQuestionAnswering(_TaskModel):
    """Start and end logits (B, T) of the answer span."""

    task = "question-answering"

    def __init__(self, config: DebertaV2Config, attn_impl: str = "sdpa"):
        super().__init__(config, attn_impl)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def head(self, x):
        start, end = self.qa_outputs(x).unbind(-1)  # (B, T) each
        return {"start_logits": start, "end_logits": end}


class MaskedLMHead(nn.Module):
    """dense + activation + LayerNorm, then the word embeddings (tied) and a vocabulary bias. The legacy head
    (``cls.predictions``) projects to the embedding width; the other (``lm_predictions``) needs it equal to C."""

    def __init__(self, config: DebertaV2Config):
        super().__init__()
        if not config.legacy and config.embedding_width != config.hidden_size:
            raise ConfigError(f"config.json 'legacy': false gives the masked-LM head the hidden width "
                              f"({config.hidden_size}), which cannot read word embeddings of 'embedding_size' "
                              f"{config.embedding_width} (transformers fails on it too). Set legacy to true.")
        width = config.embedding_width if config.legacy else config.hidden_size
        self.dense = nn.Linear(config.hidden_size, width)
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.act = ACT[config.hidden_act]

    def forward(self, x, word_embeddings: torch.Tensor):
        return F.linear(self.norm(self.act(self.dense(x))), word_embeddings, self.bias)  # (B, T, V)


class DebertaV2ForMaskedLM(_TaskModel):
    """Vocabulary logits (B, T, V) at every position."""

    task = "fill-mask"
    token_tables = {"input": "deberta.embeddings.word", "bias": "lm_head.bias"}

    def __init__(self, config: DebertaV2Config, attn_impl: str = "sdpa"):
        super().__init__(config, attn_impl)
        self.lm_head = MaskedLMHead(config)

    def head(self, x):
        return {"logits": self.lm_head(x, self.deberta.embeddings.word.weight)}
