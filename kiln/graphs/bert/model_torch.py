"""BERT family in PyTorch (BERT, RoBERTa, MiniLM), readable top to bottom.

Parameter names are kiln's own (``layers.0.attn.q``); ``weights.py`` maps them to and from the Hugging Face keys.
Shapes: B batch, T sequence, C hidden, H heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.graphs.attention import attention, head_mask_per_layer, mask_heads
from kiln.graphs.bert.config import BertConfig
from kiln.graphs.checkpoint import SavePretrainedMixin
from kiln.graphs.heads import PruneHeadsMixin, head_rows, prune_linear
from kiln.graphs.vocab import TokenEmbeddingsMixin

ACT = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


class Embeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        # DistilBERT has no token type embeddings (type_vocab_size 0).
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size else None
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.config.position_offset:  # RoBERTa, XLM-RoBERTa
            # Padding tokens keep position padding_idx; real tokens count up from padding_idx + 1.
            real = input_ids.ne(self.config.pad_token_id).long()
            return torch.cumsum(real, dim=1) * real + self.config.pad_token_id  # (B, T)
        return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)  # (1, T)

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        if position_ids is None:
            position_ids = self.position_ids(input_ids)
        x = self.word(input_ids) + self.position(position_ids)  # (B, T, C)
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        return self.norm(x)


class SelfAttention(nn.Module):
    def __init__(self, config: BertConfig, attn_impl: str, layer: int = 0):
        super().__init__()
        # A pruned layer has fewer heads (config.pruned_heads); each keeps its size.
        self.n_head, self.head_dim, self.attn_impl = config.heads_in_layer(layer), config.head_dim, attn_impl
        width = self.n_head * self.head_dim
        self.q = nn.Linear(config.hidden_size, width)
        self.k = nn.Linear(config.hidden_size, width)
        self.v = nn.Linear(config.hidden_size, width)
        self.o = nn.Linear(width, config.hidden_size)

    def prune(self, heads: list[int]) -> None:
        """Remove ``heads`` (indices among this layer's current heads)."""
        index = head_rows([h for h in range(self.n_head) if h not in heads], self.head_dim)
        self.q, self.k, self.v = (prune_linear(p, index, 0) for p in (self.q, self.k, self.v))
        self.o = prune_linear(self.o, index, 1)
        self.n_head -= len(heads)

    def forward(self, x, mask, return_probs=False, head_mask=None):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = self.v(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        y, probs = attention(q, k, v, mask=mask, impl=self.attn_impl, return_probs=return_probs)
        y, probs = mask_heads(y, probs, head_mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.o(y), probs


class MLP(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT[config.hidden_act]

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class Layer(nn.Module):
    """Post-norm transformer block, as in the original BERT."""

    def __init__(self, config: BertConfig, attn_impl: str, layer: int = 0):
        super().__init__()
        self.attn = SelfAttention(config, attn_impl, layer)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x, mask, return_probs=False, head_mask=None):
        a, probs = self.attn(x, mask, return_probs, head_mask)
        x = self.attn_norm(x + a)
        x = self.mlp_norm(x + self.mlp(x))
        return x, probs


class BertModel(SavePretrainedMixin, TokenEmbeddingsMixin, PruneHeadsMixin, nn.Module):
    """The encoder. Returns a dict with ``last_hidden_state``, ``pooler_output`` (when the checkpoint has a pooler),
    and optionally ``hidden_states`` (embeddings + each layer) and ``attentions`` (each layer's probabilities)."""

    task = "feature-extraction"
    token_tables = {"input": "embeddings.word"}

    def __init__(self, config: BertConfig, add_pooler: bool = True, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, attn_impl, i) for i in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooler else None

    def attention_modules(self) -> list:
        return [layer.attn for layer in self.layers]

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states=False, output_attentions=False, head_mask=None):
        B, T = input_ids.shape
        head_mask = head_mask_per_layer(head_mask, len(self.layers), self.config.num_attention_heads,
                                        pruned=bool(self.config.pruned_heads))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # (B, 1, T, T) bool, True = attend. Expanded over the query axis because onnxruntime's Attention kernel
        # does not broadcast the mask's query dimension.
        mask = attention_mask[:, None, None, :].bool().expand(B, 1, T, T)
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        hidden_states, attentions = [x], []
        for i, layer in enumerate(self.layers):
            x, probs = layer(x, mask, output_attentions, None if head_mask is None else head_mask[i])
            hidden_states.append(x)
            attentions.append(probs)
        out = {"last_hidden_state": x}
        if self.pooler is not None:
            out["pooler_output"] = torch.tanh(self.pooler(x[:, 0]))  # (B, C) from the first token
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        if output_attentions:
            out["attentions"] = tuple(attentions)
        return out


class ClassificationHead(nn.Module):
    """Sentence head over the first token: dense + activation, then the projection (RoBERTa: tanh, DistilBERT: relu).
    BERT itself classifies the pooler output with a single linear layer instead."""

    def __init__(self, config: BertConfig, act):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.num_labels)
        self.act = act

    def forward(self, x):
        return self.out(self.act(self.dense(x[:, 0])))


class MaskedLMHead(nn.Module):
    """dense + activation + LayerNorm, then the decoder whose weight is the word embedding matrix (tied)."""

    def __init__(self, config: BertConfig, act):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.act = act

    def forward(self, x, word_embeddings: torch.Tensor):
        return F.linear(self.norm(self.act(self.dense(x))), word_embeddings, self.bias)  # (B, T, V)


class _TaskModel(SavePretrainedMixin, TokenEmbeddingsMixin, PruneHeadsMixin, nn.Module):
    """An encoder (``self.bert``, whatever the family) plus one task head; returns a dict like transformers."""

    token_tables = {"input": "bert.embeddings.word"}

    def __init__(self, config: BertConfig, attn_impl: str, pooler: bool = False):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooler=pooler, attn_impl=attn_impl)

    def attention_modules(self) -> list:
        return self.bert.attention_modules()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states=False, output_attentions=False, head_mask=None):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states, output_attentions,
                        head_mask)
        result = self.head(out)
        result.update({k: out[k] for k in ("hidden_states", "attentions") if k in out})
        return result


class BertForSequenceClassification(_TaskModel):
    """Logits (B, num_labels). What the scores mean (softmax, sigmoid, raw) follows ``config.problem_type``."""

    task = "text-classification"

    def __init__(self, config: BertConfig, attn_impl: str = "sdpa"):
        family = config.layout
        super().__init__(config, attn_impl, pooler=family == "bert")
        if family == "bert":
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        else:
            self.classifier = ClassificationHead(config, F.relu if family == "distilbert" else torch.tanh)

    def head(self, out):
        if self.bert.pooler is not None:
            return {"logits": self.classifier(out["pooler_output"])}
        return {"logits": self.classifier(out["last_hidden_state"])}  # the head reads the first token itself


class BertForTokenClassification(_TaskModel):
    """Per-token logits (B, T, num_labels)."""

    task = "token-classification"

    def __init__(self, config: BertConfig, attn_impl: str = "sdpa"):
        super().__init__(config, attn_impl)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def head(self, out):
        return {"logits": self.classifier(out["last_hidden_state"])}


class BertForQuestionAnswering(_TaskModel):
    """Start and end logits (B, T) of the answer span."""

    task = "question-answering"

    def __init__(self, config: BertConfig, attn_impl: str = "sdpa"):
        super().__init__(config, attn_impl)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def head(self, out):
        start, end = self.qa_outputs(out["last_hidden_state"]).unbind(-1)  # (B, T) each
        return {"start_logits": start, "end_logits": end}


class BertForMaskedLM(_TaskModel):
    """Vocabulary logits (B, T, V) at every position."""

    task = "fill-mask"
    token_tables = {"input": "bert.embeddings.word", "bias": "lm_head.bias"}  # the decoder is the embedding, tied

    def __init__(self, config: BertConfig, attn_impl: str = "sdpa"):
        super().__init__(config, attn_impl)
        # RoBERTa's head always uses exact GELU; BERT and DistilBERT use the config's activation.
        self.lm_head = MaskedLMHead(config, ACT["gelu"] if config.position_offset else ACT[config.hidden_act])

    def head(self, out):
        return {"logits": self.lm_head(out["last_hidden_state"], self.bert.embeddings.word.weight)}

