"""SigLIP in PyTorch, readable top to bottom: CLIP's two towers with other ends, scored by a sigmoid.

The text tower is bidirectional (no causal mask) and pools the LAST position, whatever it holds: SigLIP's processor
pads every text to ``max_position_embeddings`` and gives no attention mask, so the last position is padding the
model learned to read; a linear ``head`` follows. The vision tower has no class token; all tokens go through
``post_layernorm`` and a learned probe query attends over them (attention pooling, then LayerNorm and an MLP with a
residual). No projections: logits are exp(``logit_scale``) * cosine + ``logit_bias``, read through a sigmoid.
The encoder layers are the same math as CLIP's and are imported from ``graphs.clip.model_torch``.
Parameter names are kiln's own; ``weights.py`` maps them to and from the Hugging Face keys.
Shapes: B batch, T tokens, N patches, C hidden, H heads, D head dim; Ch channels, Hi x Wi image.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.graphs.attention import attention
from kiln.graphs.checkpoint import SavePretrainedMixin
# The same math as SigLIP's: pre-norm encoder layer, MLP, input checks.
from kiln.graphs.clip.model_torch import MLP, Layer, all_true_mask, check_pixels, check_text, normalize, run_layers
from kiln.graphs.siglip.config import SiglipConfig, SiglipTextConfig, SiglipVisionConfig


class TextTransformer(nn.Module):
    """transformers' SiglipTextModel: ``last_hidden_state`` after the final LayerNorm; ``pooler_output`` is the
    ``head`` of its last position."""

    def __init__(self, config: SiglipTextConfig, attn_impl: str):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, attn_impl) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.output_size)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, output_attentions=False) -> dict:
        check_text(input_ids, attention_mask, self.config.max_position_embeddings)
        B, T = input_ids.shape
        x = self.embed(input_ids) + self.position.weight[:T]  # (B, T, C)
        if attention_mask is not None:  # padding only; expanded as onnxruntime does not broadcast the query axis
            mask = attention_mask.bool()[:, None, None, :].expand(B, 1, T, T)  # (B, 1, T, T)
        else:
            mask = all_true_mask(x) if output_attentions else None
        x, extras = run_layers(self.layers, x, mask, output_hidden_states, output_attentions)
        x = self.norm(x)  # (B, T, C)
        return {"last_hidden_state": x, "pooler_output": self.head(x[:, -1]), **extras}  # pooled: (B, P)


class AttentionPoolingHead(nn.Module):
    """transformers' SiglipMultiheadAttentionPoolingHead. Its ``nn.MultiheadAttention`` is written out here: q/k/v
    are slices of the one ``in_proj`` (its ``in_proj_weight``/``in_proj_bias``, kept fused as the checkpoint
    stores them), and the attention is graphs.attention's, so it exports as one fused node."""

    def __init__(self, config: SiglipVisionConfig, attn_impl: str):
        super().__init__()
        self.n_head, self.head_dim, self.attn_impl = config.num_attention_heads, config.head_dim, attn_impl
        C = config.hidden_size
        self.probe = nn.Parameter(torch.zeros(1, 1, C))
        self.in_proj = nn.Linear(C, 3 * C)  # rows: query, key, value
        self.o = nn.Linear(C, C)
        self.norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x):
        B, N, C = x.shape
        w, b = self.in_proj.weight, self.in_proj.bias  # slices, not chunk(): the exporter folds Slice, not Split
        q = F.linear(self.probe, w[:C], b[:C]).expand(B, 1, C)  # (B, 1, C): the same query for every image
        q = q.view(B, 1, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, 1, D)
        k = F.linear(x, w[C:2 * C], b[C:2 * C]).view(B, N, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, N, D)
        v = F.linear(x, w[2 * C:], b[2 * C:]).view(B, N, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, N, D)
        y, _ = attention(q, k, v, impl=self.attn_impl)  # (B, H, 1, D): the probe's query per head
        y = self.o(y.transpose(1, 2).reshape(B, 1, C))  # (B, 1, C)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]  # (B, C)


class VisionTransformer(nn.Module):
    """transformers' SiglipVisionModel: ``last_hidden_state`` after ``post_layernorm``; ``pooler_output`` its
    attention pooling."""

    def __init__(self, config: SiglipVisionConfig, attn_impl: str):
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.patch = nn.Conv2d(config.num_channels, C, kernel_size=config.patch_size, stride=config.patch_size)
        self.position = nn.Embedding(config.num_patches, C)
        self.layers = nn.ModuleList(Layer(config, attn_impl) for _ in range(config.num_hidden_layers))
        self.post_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.head = AttentionPoolingHead(config, attn_impl)

    def forward(self, pixel_values, output_hidden_states=False, output_attentions=False) -> dict:
        check_pixels(pixel_values, self.config)
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)  # (B, N, C), patches in row-major order
        x = x + self.position.weight  # (B, N, C)
        mask = all_true_mask(x) if output_attentions else None  # images have no padding
        x, extras = run_layers(self.layers, x, mask, output_hidden_states, output_attentions)
        x = self.post_norm(x)
        return {"last_hidden_state": x, "pooler_output": self.head(x), **extras}  # (B, N, C), (B, C)


class SiglipModel(SavePretrainedMixin, nn.Module):
    """transformers' SiglipModel. ``forward`` returns a dict with transformers' keys: ``logits_per_image`` (B_img,
    B_txt), ``logits_per_text`` (B_txt, B_img), ``text_embeds`` and ``image_embeds`` (L2-normalized), and
    ``text_model_output`` / ``vision_model_output`` (each tower's dict, hidden_states / attentions on request)."""

    task = "zero-shot-image-classification"

    def __init__(self, config: SiglipConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config.text, attn_impl)
        self.vision_model = VisionTransformer(config.vision, attn_impl)
        self.logit_scale = nn.Parameter(torch.zeros(1))
        self.logit_bias = nn.Parameter(torch.zeros(1))

    def get_text_features(self, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, P) text embeddings (the text head's output), not normalized."""
        return self.text_model(input_ids, attention_mask)["pooler_output"]

    def get_image_features(self, pixel_values) -> torch.Tensor:
        """(B, P) image embeddings (the attention pooling's output), not normalized."""
        return self.vision_model(pixel_values)["pooler_output"]

    def forward(self, input_ids, pixel_values, attention_mask=None, output_hidden_states=False,
                output_attentions=False) -> dict:
        text = self.text_model(input_ids, attention_mask, output_hidden_states, output_attentions)
        vision = self.vision_model(pixel_values, output_hidden_states, output_attentions)
        text_embeds, image_embeds = normalize(text["pooler_output"]), normalize(vision["pooler_output"])  # (B, P)
        logits_per_text = text_embeds @ image_embeds.t() * self.logit_scale.exp() + self.logit_bias  # (B_txt, B_img)
        return {"logits_per_image": logits_per_text.t(), "logits_per_text": logits_per_text,
                "text_embeds": text_embeds, "image_embeds": image_embeds,
                "text_model_output": text, "vision_model_output": vision}

    def export_graphs(self) -> dict:
        """The artifact's two graphs as modules: ``text`` and ``vision``. They return unnormalized embeddings; the
        runtime normalizes them and applies ``logit_scale`` and ``logit_bias`` (weights, not in either graph)."""
        return {"text": TextGraph(self), "vision": VisionGraph(self)}


class TextGraph(nn.Module):
    """``input_ids`` (B, T), padded to 64 tokens as transformers' pipeline pads SigLIP prompts, and the tokenizer's
    ``attention_mask`` (transformers' SiglipTokenizer returns one and its pipeline passes it on; SigLIP still pools
    the last position, a padding one when the prompt is short) -> ``text_embeds`` (B, P) unnormalized,
    ``last_hidden_state``."""

    def __init__(self, model: SiglipModel):
        super().__init__()
        self.model, self.config = model, model.config
        self.attention_nodes = model.config.text.num_hidden_layers  # one fused node per text layer

    def forward(self, input_ids, attention_mask):
        out = self.model.text_model(input_ids, attention_mask)
        return {"text_embeds": out["pooler_output"], "last_hidden_state": out["last_hidden_state"]}


class VisionGraph(nn.Module):
    """``pixel_values`` (B, Ch, Hi, Wi) -> ``image_embeds`` (B, P) unnormalized, ``last_hidden_state``."""

    def __init__(self, model: SiglipModel):
        super().__init__()
        self.model, self.config = model, model.config
        self.attention_nodes = model.config.vision.num_hidden_layers + 1  # each layer, and the pooling head

    def forward(self, pixel_values):
        out = self.model.vision_model(pixel_values)
        return {"image_embeds": out["pooler_output"], "last_hidden_state": out["last_hidden_state"]}
