"""BERT family in JAX (flax nnx): the sibling of ``model_torch.py``, same classes, same parameter names and shapes.

Each parameter's path is the torch ``state_dict`` key (``layers.0.attn.q.weight``), stored in PyTorch layout, so
``weights.py`` serves both. ``attn_impl`` picks the attention math (``graphs/attention_jax.py``): ``sdpa`` exports
as one ONNX ``Attention`` node per layer through jax2onnx, ``eager`` as MatMul/Softmax; ``output_attentions``
always uses ``eager``. Inputs may be NumPy or jax arrays.
Shapes: B batch, T sequence, C hidden, H heads, D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kiln.graphs.attention_jax import attention
from kiln.graphs.bert.config import BertConfig
from kiln.graphs.checkpoint import SavePretrainedMixin
from kiln.graphs.layers_jax import Embedding, LayerNorm, Linear, StateDict

ACT = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


class Embeddings(nnx.Module):
    def __init__(self, config: BertConfig):
        self.config = config
        self.word = Embedding(config.vocab_size, config.hidden_size)
        self.position = Embedding(config.max_position_embeddings, config.hidden_size)
        # DistilBERT has no token type embeddings (type_vocab_size 0).
        self.token_type = Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size else None
        self.norm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def position_ids(self, input_ids):
        if self.config.position_offset:  # RoBERTa, XLM-RoBERTa
            # Padding tokens keep position padding_idx; real tokens count up from padding_idx + 1.
            real = (input_ids != self.config.pad_token_id).astype(jnp.int32)
            return jnp.cumsum(real, axis=1) * real + self.config.pad_token_id  # (B, T)
        # An iota, not jnp.arange: jax2onnx's arange cannot be indexed when T is symbolic.
        return jax.lax.broadcasted_iota(jnp.int32, (1, input_ids.shape[1]), 1)  # (1, T)

    def __call__(self, input_ids, token_type_ids=None, position_ids=None):
        if position_ids is None:
            position_ids = self.position_ids(input_ids)
        x = self.word(input_ids) + self.position(position_ids)  # (B, T, C)
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids if token_type_ids is not None else jnp.zeros_like(input_ids))
        return self.norm(x)


class SelfAttention(nnx.Module):
    def __init__(self, config: BertConfig, attn_impl: str):
        self.n_head, self.head_dim, self.attn_impl = config.num_attention_heads, config.head_dim, attn_impl
        self.q = Linear(config.hidden_size, config.hidden_size)
        self.k = Linear(config.hidden_size, config.hidden_size)
        self.v = Linear(config.hidden_size, config.hidden_size)
        self.o = Linear(config.hidden_size, config.hidden_size)

    def __call__(self, x, mask, return_probs=False):
        B, T, C = x.shape
        q = self.q(x).reshape(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.k(x).reshape(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        v = self.v(x).reshape(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        y, probs = attention(q, k, v, mask=mask, impl=self.attn_impl, return_probs=return_probs)
        return self.o(y.reshape(B, T, C)), probs  # (B, T, C)


class MLP(nnx.Module):
    def __init__(self, config: BertConfig):
        self.up = Linear(config.hidden_size, config.intermediate_size)
        self.down = Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT[config.hidden_act]

    def __call__(self, x):
        return self.down(self.act(self.up(x)))


class Layer(nnx.Module):
    """Post-norm transformer block, as in the original BERT."""

    def __init__(self, config: BertConfig, attn_impl: str):
        self.attn = SelfAttention(config, attn_impl)
        self.attn_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.mlp = MLP(config)
        self.mlp_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def __call__(self, x, mask, return_probs=False):
        a, probs = self.attn(x, mask, return_probs)
        x = self.attn_norm(x + a)
        x = self.mlp_norm(x + self.mlp(x))
        return x, probs


class BertModel(SavePretrainedMixin, StateDict, nnx.Module):
    """The encoder. Returns a dict with ``last_hidden_state``, ``pooler_output`` (when the checkpoint has a pooler),
    and optionally ``hidden_states`` (embeddings + each layer) and ``attentions`` (each layer's probabilities)."""

    task = "feature-extraction"

    def __init__(self, config: BertConfig, add_pooler: bool = True, attn_impl: str = "sdpa"):
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nnx.List([Layer(config, attn_impl) for _ in range(config.num_hidden_layers)])
        self.pooler = Linear(config.hidden_size, config.hidden_size) if add_pooler else None

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 output_hidden_states=False, output_attentions=False):
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        # (B, 1, T, T) bool, True = attend. Expanded over the query axis because onnxruntime's Attention kernel
        # does not broadcast the mask's query dimension.
        mask = jnp.broadcast_to(attention_mask[:, None, None, :] != 0, (B, 1, T, T))
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        hidden_states, attentions = [x], []
        for layer in self.layers:
            x, probs = layer(x, mask, output_attentions)
            hidden_states.append(x)
            attentions.append(probs)
        out = {"last_hidden_state": x}
        if self.pooler is not None:
            out["pooler_output"] = jnp.tanh(self.pooler(x[:, 0]))  # (B, C) from the first token
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        if output_attentions:
            out["attentions"] = tuple(attentions)
        return out


class ClassificationHead(nnx.Module):
    """Sentence head over the first token: dense + activation, then the projection (RoBERTa: tanh, DistilBERT: relu).
    BERT itself classifies the pooler output with a single linear layer instead."""

    def __init__(self, config: BertConfig, act):
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.out = Linear(config.hidden_size, config.num_labels)
        self.act = act

    def __call__(self, x):
        return self.out(self.act(self.dense(x[:, 0])))


class MaskedLMHead(nnx.Module):
    """dense + activation + LayerNorm, then the decoder whose weight is the word embedding matrix (tied)."""

    def __init__(self, config: BertConfig, act):
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.norm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.bias = nnx.Param(jnp.zeros((config.vocab_size,), jnp.float32))
        self.act = act

    def __call__(self, x, word_embeddings):
        return self.norm(self.act(self.dense(x))) @ word_embeddings.T + self.bias[...]  # (B, T, V)


class _TaskModel(SavePretrainedMixin, StateDict, nnx.Module):
    """An encoder (``self.bert``, whatever the family) plus one task head; returns a dict like transformers."""

    def __init__(self, config: BertConfig, attn_impl: str, pooler: bool = False):
        self.config = config
        self.bert = BertModel(config, add_pooler=pooler, attn_impl=attn_impl)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 output_hidden_states=False, output_attentions=False):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states, output_attentions)
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
            self.classifier = Linear(config.hidden_size, config.num_labels)
        else:
            self.classifier = ClassificationHead(config, jax.nn.relu if family == "distilbert" else jnp.tanh)

    def head(self, out):
        if self.bert.pooler is not None:
            return {"logits": self.classifier(out["pooler_output"])}
        return {"logits": self.classifier(out["last_hidden_state"])}  # the head reads the first token itself


class BertForTokenClassification(_TaskModel):
    """Per-token logits (B, T, num_labels)."""

    task = "token-classification"

    def __init__(self, config: BertConfig, attn_impl: str = "sdpa"):
        super().__init__(config, attn_impl)
        self.classifier = Linear(config.hidden_size, config.num_labels)

    def head(self, out):
        return {"logits": self.classifier(out["last_hidden_state"])}


class BertForQuestionAnswering(_TaskModel):
    """Start and end logits (B, T) of the answer span."""

    task = "question-answering"

    def __init__(self, config: BertConfig, attn_impl: str = "sdpa"):
        super().__init__(config, attn_impl)
        self.qa_outputs = Linear(config.hidden_size, 2)

    def head(self, out):
        logits = self.qa_outputs(out["last_hidden_state"])  # (B, T, 2)
        return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}  # (B, T) each


class BertForMaskedLM(_TaskModel):
    """Vocabulary logits (B, T, V) at every position."""

    task = "fill-mask"

    def __init__(self, config: BertConfig, attn_impl: str = "sdpa"):
        super().__init__(config, attn_impl)
        # RoBERTa's head always uses exact GELU; BERT and DistilBERT use the config's activation.
        self.lm_head = MaskedLMHead(config, ACT["gelu"] if config.position_offset else ACT[config.hidden_act])

    def head(self, out):
        return {"logits": self.lm_head(out["last_hidden_state"], self.bert.embeddings.word.weight[...])}

