"""Vision Transformer (ViT) in PyTorch, readable top to bottom.

An image becomes a sequence: non-overlapping patches, each projected to a vector by one strided convolution, behind a
learned CLS token, plus learned absolute position embeddings. Then pre-norm transformer layers, a final LayerNorm,
and a linear classifier on the CLS token. Parameter names are kiln's own (``layers.0.attn.q``); ``weights.py`` maps
them to and from the Hugging Face keys.
Shapes: B batch, T tokens (1 + patches), C hidden, H heads, D head dim; Ch channels, Hi x Wi image, P patch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.errors import ConfigError, InputError
from kiln.graphs.attention import attention, head_mask_per_layer, mask_heads
from kiln.graphs.checkpoint import SavePretrainedMixin
from kiln.graphs.vocab import TokenEmbeddingsMixin
from kiln.graphs.vit.config import ViTConfig

# Copied from graphs.bert.model_torch.ACT
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
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.patch = nn.Conv2d(config.num_channels, C, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, C))
        self.position = nn.Parameter(torch.zeros(1, config.sequence_length, C))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, Ch, Hi, Wi = pixel_values.shape
        if Ch != self.config.num_channels or (Hi, Wi) != tuple(self.config.image_size):
            # The position embeddings are learned for one grid; transformers can interpolate them
            # (interpolate_pos_encoding=True), kiln cannot yet.
            want = (self.config.num_channels, *self.config.image_size)
            raise InputError(f"pixel_values have shape (Ch, Hi, Wi) = {(Ch, Hi, Wi)} but this ViT takes {want}: "
                             f"resize images to {want[1]}x{want[2]} (the image processor does).")
        x = self.patch(pixel_values)  # (B, C, Hi/P, Wi/P)
        x = x.flatten(2).transpose(1, 2)  # (B, T-1, C), patches in row-major order
        x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1)  # (B, T, C)
        return x + self.position


class SelfAttention(nn.Module):
    """Copied from graphs.bert.model_torch.SelfAttention, with the query/key/value biases optional (qkv_bias)."""

    def __init__(self, config: ViTConfig, attn_impl: str):
        super().__init__()
        self.n_head, self.head_dim, self.attn_impl = config.num_attention_heads, config.head_dim, attn_impl
        self.q = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.v = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.o = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, mask, return_probs=False, head_mask=None):
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = self.v(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        y, probs = attention(q, k, v, mask=mask, impl=self.attn_impl, return_probs=return_probs)
        y, probs = mask_heads(y, probs, head_mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.o(y), probs


class MLP(nn.Module):
    """Copied from graphs.bert.model_torch.MLP"""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT[config.hidden_act]

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class Layer(nn.Module):
    """Pre-norm transformer block (LayerNorm before attention and before the MLP), unlike BERT's post-norm."""

    def __init__(self, config: ViTConfig, attn_impl: str):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config, attn_impl)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, mask, return_probs=False, head_mask=None):
        a, probs = self.attn(self.attn_norm(x), mask, return_probs, head_mask)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return x, probs


class ViTModel(SavePretrainedMixin, TokenEmbeddingsMixin, nn.Module):
    """The encoder. Returns a dict with ``last_hidden_state`` (after the final LayerNorm), ``pooler_output`` (when the
    checkpoint has a pooler), and optionally ``hidden_states`` (embeddings + each layer, before the final LayerNorm,
    as transformers) and ``attentions`` (each layer's probabilities)."""

    task = "feature-extraction"

    def __init__(self, config: ViTConfig, add_pooler: bool = True, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, attn_impl) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = nn.Linear(config.hidden_size, config.pooler_size) if add_pooler else None
        self.pooler_act = ACT[config.pooler_act]

    def forward(self, pixel_values, output_hidden_states=False, output_attentions=False, head_mask=None):
        x = self.embeddings(pixel_values)  # (B, T, C)
        head_mask = head_mask_per_layer(head_mask, len(self.layers), self.config.num_attention_heads)
        B, T, _ = x.shape
        # Images have no padding, so attention needs no mask. But graphs.attention fuses the probabilities into ONE
        # op (one exported Attention node per layer) only when given a mask: pass an all-true one in that case.
        mask = torch.ones(B, 1, T, T, dtype=torch.bool, device=x.device) if output_attentions else None
        hidden_states, attentions = [x], []
        for i, layer in enumerate(self.layers):
            x, probs = layer(x, mask, output_attentions, None if head_mask is None else head_mask[i])
            hidden_states.append(x)
            attentions.append(probs)
        out = {"last_hidden_state": self.norm(x)}
        if self.pooler is not None:
            out["pooler_output"] = self.pooler_act(self.pooler(out["last_hidden_state"][:, 0]))  # (B, pooler size)
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        if output_attentions:
            out["attentions"] = tuple(attentions)
        return out


class ViTForImageClassification(SavePretrainedMixin, TokenEmbeddingsMixin, nn.Module):
    """Logits (B, num_labels) from the CLS token of the normed last hidden state. What the scores mean (softmax,
    sigmoid, raw) follows ``config.problem_type``, as in transformers' pipeline."""

    task = "image-classification"

    def __init__(self, config: ViTConfig, attn_impl: str = "sdpa"):
        if config.num_labels < 1:
            raise ConfigError("config.json has no labels (empty 'id2label'); image-classification needs at least one. "
                              "Export with --task feature-extraction for the image embeddings instead.")
        super().__init__()
        self.config = config
        self.vit = ViTModel(config, add_pooler=False, attn_impl=attn_impl)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pixel_values, output_hidden_states=False, output_attentions=False, head_mask=None):
        out = self.vit(pixel_values, output_hidden_states, output_attentions, head_mask)
        result = {"logits": self.classifier(out["last_hidden_state"][:, 0])}  # (B, num_labels)
        result.update({k: out[k] for k in ("hidden_states", "attentions") if k in out})
        return result

