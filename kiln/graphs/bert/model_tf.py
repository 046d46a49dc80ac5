"""BERT family in keras 3 on the TensorFlow backend: the sibling of ``model_torch.py``, same classes, same parameter
names (``layers.0.attn.q.weight``) and PyTorch layouts (Linear weights (out, in)), checked against it numerically.

Keras names variables its own way, so ``state_dict()`` walks the attribute tree like torch does. The models are plain
``keras.layers.Layer`` objects (a ``keras.Model`` would bring its own ``layers``, ``save`` and ``load_weights``), built
eagerly in ``__init__``. Shapes: B batch, T sequence, C hidden, H heads, D head dim.
"""

from __future__ import annotations

# layers_tf first: it loads triton before TensorFlow (see there), and hands over tf.
from kiln.graphs.layers_tf import Embedding, LayerNorm, Linear, Module, tf  # isort: skip

import math

from kiln.graphs.bert.config import BertConfig
from kiln.graphs.checkpoint import SavePretrainedMixin


def gelu(x):
    """Exact GELU as torch computes it. (tf.nn.gelu's exact form uses Erfc, which tf2onnx cannot convert.)"""
    return x * 0.5 * (1.0 + tf.math.erf(x * 0.7071067811865476))


ACT = {
    "gelu": gelu,
    "gelu_new": lambda x: tf.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: tf.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: tf.nn.gelu(x, approximate=True),
    "relu": tf.nn.relu,
    "silu": tf.nn.silu,
    "swish": tf.nn.silu,
    "tanh": tf.tanh,
}


def attention(q, k, v, mask):
    """The eager math of ``kiln.graphs.attention.eager``: q, k, v (B, H, T, D); mask bool broadcastable to
    (B, H, T, T), True = attend. Returns (out (B, H, T, D), probs (B, H, T, T))."""
    scores = tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, T)
    # finfo.min rather than -inf: a fully padded row then averages v instead of producing NaN, as transformers does.
    scores = tf.where(mask, scores, tf.float32.min)
    probs = tf.nn.softmax(scores, axis=-1)
    return tf.matmul(probs, v), probs


class Embeddings(Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.word = Embedding(config.vocab_size, config.hidden_size)
        self.position = Embedding(config.max_position_embeddings, config.hidden_size)
        # DistilBERT has no token type embeddings (type_vocab_size 0).
        self.token_type = Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size else None
        self.norm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def position_ids(self, input_ids):
        if self.config.position_offset:  # RoBERTa, XLM-RoBERTa
            # Padding tokens keep position padding_idx; real tokens count up from padding_idx + 1.
            real = tf.cast(tf.not_equal(input_ids, self.config.pad_token_id), input_ids.dtype)
            return tf.cumsum(real, axis=1) * real + self.config.pad_token_id  # (B, T)
        return tf.range(tf.shape(input_ids)[1])[None]  # (1, T)

    def call(self, input_ids, token_type_ids=None, position_ids=None):
        if position_ids is None:
            position_ids = self.position_ids(input_ids)
        x = self.word(input_ids) + self.position(position_ids)  # (B, T, C)
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids if token_type_ids is not None else tf.zeros_like(input_ids))
        return self.norm(x)


class SelfAttention(Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.n_head, self.head_dim = config.num_attention_heads, config.head_dim
        self.q = Linear(config.hidden_size, config.hidden_size)
        self.k = Linear(config.hidden_size, config.hidden_size)
        self.v = Linear(config.hidden_size, config.hidden_size)
        self.o = Linear(config.hidden_size, config.hidden_size)

    def split_heads(self, x, B, T):
        return tf.transpose(tf.reshape(x, (B, T, self.n_head, self.head_dim)), (0, 2, 1, 3))  # (B, H, T, D)

    def call(self, x, mask):
        B, T, C = tf.shape(x)[0], tf.shape(x)[1], x.shape[-1]
        q, k, v = (self.split_heads(proj(x), B, T) for proj in (self.q, self.k, self.v))  # (B, H, T, D) each
        y, probs = attention(q, k, v, mask)
        y = tf.reshape(tf.transpose(y, (0, 2, 1, 3)), (B, T, C))  # (B, T, C)
        return self.o(y), probs


class MLP(Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.up = Linear(config.hidden_size, config.intermediate_size)
        self.down = Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT[config.hidden_act]

    def call(self, x):
        return self.down(self.act(self.up(x)))


class Layer(Module):
    """Post-norm transformer block, as in the original BERT."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attn = SelfAttention(config)
        self.attn_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.mlp = MLP(config)
        self.mlp_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def call(self, x, mask):
        a, probs = self.attn(x, mask)
        x = self.attn_norm(x + a)
        x = self.mlp_norm(x + self.mlp(x))
        return x, probs


class BertModel(SavePretrainedMixin, Module):
    """The encoder. Returns a dict with ``last_hidden_state``, ``pooler_output`` (when the checkpoint has a pooler),
    and optionally ``hidden_states`` (embeddings + each layer) and ``attentions`` (each layer's probabilities).
    Inputs are NumPy arrays or tf tensors. ``attn_impl`` is accepted for the torch signature and ignored: TensorFlow
    has one attention here, the eager math."""

    task = "feature-extraction"

    def __init__(self, config: BertConfig, add_pooler: bool = True, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = [Layer(config) for _ in range(config.num_hidden_layers)]
        self.pooler = Linear(config.hidden_size, config.hidden_size) if add_pooler else None

    def call(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
             output_hidden_states=False, output_attentions=False):
        if attention_mask is None:
            attention_mask = tf.ones_like(input_ids)
        # (B, 1, 1, T) bool, True = attend, broadcast over the queries (no ONNX Attention node to need it expanded).
        mask = tf.not_equal(attention_mask, 0)[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        hidden_states, attentions = [x], []
        for layer in self.layers:
            x, probs = layer(x, mask)
            hidden_states.append(x)
            attentions.append(probs)
        out = {"last_hidden_state": x}
        if self.pooler is not None:
            out["pooler_output"] = tf.tanh(self.pooler(x[:, 0]))  # (B, C) from the first token
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        if output_attentions:
            out["attentions"] = tuple(attentions)
        return out


class ClassificationHead(Module):
    """Sentence head over the first token: dense + activation, then the projection (RoBERTa: tanh, DistilBERT: relu).
    BERT itself classifies the pooler output with a single linear layer instead."""

    def __init__(self, config: BertConfig, act):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.out = Linear(config.hidden_size, config.num_labels)
        self.act = act

    def call(self, x):
        return self.out(self.act(self.dense(x[:, 0])))


class MaskedLMHead(Module):
    """dense + activation + LayerNorm, then the decoder whose weight is the word embedding matrix (tied)."""

    def __init__(self, config: BertConfig, act):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.norm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.bias = self.add_weight(shape=(config.vocab_size,), initializer="zeros", name="bias")
        self.act = act

    def call(self, x, word_embeddings):
        return tf.matmul(self.norm(self.act(self.dense(x))), word_embeddings, transpose_b=True) + self.bias  # (B, T, V)


class _TaskModel(SavePretrainedMixin, Module):
    """An encoder (``self.bert``, whatever the family) plus one task head; returns a dict like transformers.
    ``attn_impl`` is accepted for the torch signature and ignored."""

    def __init__(self, config: BertConfig, attn_impl: str, pooler: bool = False):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooler=pooler, attn_impl=attn_impl)

    def call(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
             output_hidden_states=False, output_attentions=False):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                        output_hidden_states=output_hidden_states, output_attentions=output_attentions)
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
            self.classifier = ClassificationHead(config, tf.nn.relu if family == "distilbert" else tf.tanh)

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
        start, end = tf.unstack(self.qa_outputs(out["last_hidden_state"]), axis=-1)  # (B, T) each
        return {"start_logits": start, "end_logits": end}


class BertForMaskedLM(_TaskModel):
    """Vocabulary logits (B, T, V) at every position."""

    task = "fill-mask"

    def __init__(self, config: BertConfig, attn_impl: str = "sdpa"):
        super().__init__(config, attn_impl)
        # RoBERTa's head always uses exact GELU; BERT and DistilBERT use the config's activation.
        self.lm_head = MaskedLMHead(config, ACT["gelu"] if config.position_offset else ACT[config.hidden_act])

    def head(self, out):
        return {"logits": self.lm_head(out["last_hidden_state"], word_embeddings=self.bert.embeddings.word.weight)}

