"""DINOv2 in PyTorch, readable top to bottom: a ViT sibling (kiln.graphs.vit.model_torch), whose attention and MLP
it reuses.

What differs from ViT: the position embeddings are interpolated (bicubic) to the patch grid of the input, as
transformers' ``interpolate_pos_encoding``, since checkpoints are trained at 518 pixels and run at 224; each residual
branch is scaled by a learned per-channel "layer scale"; the MLP may be SwiGLU (dinov2-giant); the pooled output is the
normed CLS token (no pooler weights); and the classifier reads the CLS token beside the mean of the patch tokens.
Stochastic depth (drop path) is the identity at inference, and the mask token serves pretraining only: neither is here.
Shapes: B batch, T tokens (1 + patches), C hidden, H heads, D head dim; Ch channels, Hi x Wi image, Gh x Gw patch
grid, F SwiGLU width.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.errors import ConfigError, InputError
from kiln.graphs.checkpoint import SavePretrainedMixin, replace_config
from kiln.graphs.dinov2.config import Dinov2Config, processed_size
from kiln.graphs.vit.model_torch import MLP, SelfAttention
from kiln.graphs.vocab import TokenEmbeddingsMixin

log = logging.getLogger("kiln")


class Embeddings(nn.Module):
    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.config = config
        C, (Gh, Gw) = config.hidden_size, config.position_grid
        self.patch = nn.Conv2d(config.num_channels, C, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, C))
        self.position = nn.Parameter(torch.zeros(1, 1 + Gh * Gw, C))  # CLS, then the learned grid row by row

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings (1, T, C) for a Gh x Gw grid: the learned ones, or the learned grid resized bicubically
        as transformers does (float32, align_corners=False, no antialiasing). An exported graph has one grid, so
        the resize sees constants only."""
        if grid == self.config.position_grid:  # transformers skips it too (a resize to the same grid is the identity)
            return self.position
        G, C = self.config.position_grid[0], self.config.hidden_size
        cls, patches = self.position[:, :1], self.position[:, 1:]  # (1, 1, C), (1, G*G, C)
        patches = patches.reshape(1, G, G, C).permute(0, 3, 1, 2)  # (1, C, G, G)
        patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)  # (1, C, Gh, Gw)
        patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], C)  # (1, Gh*Gw, C)
        return torch.cat([cls, patches], dim=1)  # (1, T, C)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, Ch, Hi, Wi = pixel_values.shape
        P = self.config.patch_size
        if Ch != self.config.num_channels or Hi < P[0] or Wi < P[1]:
            raise InputError(f"pixel_values have shape (Ch, Hi, Wi) = {(Ch, Hi, Wi)}; this DINOv2 takes "
                             f"{self.config.num_channels} channels and images of at least {P[0]}x{P[1]} (one patch).")
        x = self.patch(pixel_values)  # (B, C, Gh, Gw)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, Gh*Gw, C), patches in row-major order
        x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1)  # (B, T, C)
        return x + self.positions(grid)


class SwiGLU(nn.Module):
    """silu(gate) * up, then down; gate and up are one fused matrix in the checkpoint (``weights_in``), kept so."""

    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.swiglu_size)
        self.down = nn.Linear(config.swiglu_size, config.hidden_size)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, F) each: the first half gates
        return self.down(F.silu(gate) * up)


class Layer(nn.Module):
    """ViT's pre-norm block with each branch scaled per channel by a learned layer scale."""

    def __init__(self, config: Dinov2Config, attn_impl: str):
        super().__init__()
        C = config.hidden_size
        self.attn_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config, attn_impl)
        self.attn_scale = nn.Parameter(torch.full((C,), float(config.layerscale_value)))
        self.mlp_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.mlp = SwiGLU(config) if config.use_swiglu_ffn else MLP(config)
        self.mlp_scale = nn.Parameter(torch.full((C,), float(config.layerscale_value)))

    def forward(self, x, mask, return_probs=False):
        a, probs = self.attn(self.attn_norm(x), mask, return_probs)
        x = x + a * self.attn_scale
        x = x + self.mlp(self.mlp_norm(x)) * self.mlp_scale
        return x, probs


class Pooler(nn.Module):
    """transformers' DINOv2 pooler_output: the CLS token of the normed last hidden state, with no weights."""

    def forward(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        return last_hidden_state[:, 0]  # (B, C)


class ProcessorSizeMixin:
    """The exporter calls ``use_preprocessor_config`` when the checkpoint has a preprocessor_config.json."""

    def use_preprocessor_config(self, processor: dict) -> None:
        """Export for the images the checkpoint's image processor makes (its crop: 224 for facebook/dinov2-*), not
        for config.json's image_size (518, the training size), as transformers runs the model."""
        size = processed_size(processor)
        if size is None:
            log.warning("preprocessor_config.json makes images of no one size (a shortest-edge resize without a "
                        "center crop); exporting DINOv2 at config.json's image_size %s.", list(self.config.image_size))
            return
        replace_config(self, {}, input_size=size)  # kiln's own field: config.json stays as it is
        self.config.validate()


class Dinov2Model(ProcessorSizeMixin, SavePretrainedMixin, TokenEmbeddingsMixin, nn.Module):
    """The encoder. Returns a dict with ``last_hidden_state`` (after the final LayerNorm), ``pooler_output`` (its
    CLS token), and optionally ``hidden_states`` (embeddings + each layer, before the final LayerNorm, as
    transformers) and ``attentions`` (each layer's probabilities). Takes images of any size of at least one patch."""

    task = "feature-extraction"

    def __init__(self, config: Dinov2Config, attn_impl: str = "sdpa", add_pooler: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, attn_impl) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = Pooler() if add_pooler else None

    def forward(self, pixel_values, output_hidden_states=False, output_attentions=False):
        x = self.embeddings(pixel_values)  # (B, T, C)
        B, T, _ = x.shape
        # Copied from graphs.vit.model_torch.ViTModel.forward: an all-true mask only to get the probabilities from
        # ONE fused op per layer (images have no padding).
        mask = torch.ones(B, 1, T, T, dtype=torch.bool, device=x.device) if output_attentions else None
        hidden_states, attentions = [x], []
        for layer in self.layers:
            x, probs = layer(x, mask, output_attentions)
            hidden_states.append(x)
            attentions.append(probs)
        out = {"last_hidden_state": self.norm(x)}
        if self.pooler is not None:
            out["pooler_output"] = self.pooler(out["last_hidden_state"])  # (B, C)
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        if output_attentions:
            out["attentions"] = tuple(attentions)
        return out


class Dinov2ForImageClassification(ProcessorSizeMixin, SavePretrainedMixin, TokenEmbeddingsMixin, nn.Module):
    """Logits (B, num_labels) from the CLS token and the mean of the patch tokens of the normed last hidden state,
    side by side, as transformers. What the scores mean follows ``config.problem_type``, as in its pipeline."""

    task = "image-classification"

    def __init__(self, config: Dinov2Config, attn_impl: str = "sdpa"):
        if config.num_labels < 1:
            raise ConfigError("config.json has no labels (empty 'id2label'); image-classification needs at least one. "
                              "Export with --task feature-extraction for the image embeddings instead.")
        super().__init__()
        self.config = config
        self.dinov2 = Dinov2Model(config, attn_impl=attn_impl, add_pooler=False)
        self.classifier = nn.Linear(2 * config.hidden_size, config.num_labels)

    def forward(self, pixel_values, output_hidden_states=False, output_attentions=False):
        out = self.dinov2(pixel_values, output_hidden_states, output_attentions)
        h = out["last_hidden_state"]  # (B, T, C)
        features = torch.cat([h[:, 0], h[:, 1:].mean(dim=1)], dim=-1)  # (B, 2C): CLS, mean patch token
        result = {"logits": self.classifier(features)}  # (B, num_labels)
        result.update({k: out[k] for k in ("hidden_states", "attentions") if k in out})
        return result
