"""CLIP in PyTorch, readable top to bottom: a text tower and a vision tower embedding into one space.

The text tower is a causal pre-norm transformer over token + position embeddings; a sequence is pooled at its EOS
token. The vision tower is a ViT (patches by a strided conv without bias, a class token, position embeddings) with a
LayerNorm before the layers ("pre_layrnorm", as transformers spells it) and one on the pooled class token after.
Each pooled vector is projected (no bias) to ``projection_dim``; the logits are the cosine similarities times
exp(``logit_scale``). Parameter names are kiln's own; ``weights.py`` maps them to and from the Hugging Face keys.
Shapes: B batch, T tokens, C hidden, H heads, D head dim, P projection; Ch channels, Hi x Wi image.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.errors import InputError
from kiln.graphs.attention import attention
from kiln.graphs.checkpoint import SavePretrainedMixin
from kiln.graphs.clip.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

# Copied from graphs.bert.model_torch.ACT, with CLIP's quick_gelu.
ACT = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


class SelfAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections (CLIP's and SigLIP's CLIPAttention)."""

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig, attn_impl: str):
        super().__init__()
        self.n_head, self.head_dim, self.attn_impl = config.num_attention_heads, config.head_dim, attn_impl
        C = config.hidden_size
        self.q, self.k, self.v, self.o = (nn.Linear(C, C) for _ in range(4))

    def forward(self, x, mask, return_probs=False):
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = self.v(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        y, probs = attention(q, k, v, mask=mask, impl=self.attn_impl, return_probs=return_probs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.o(y), probs


class MLP(nn.Module):
    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT[config.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    """Pre-norm transformer block (transformers' CLIPEncoderLayer; SigLIP's is the same math)."""

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig, attn_impl: str):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config, attn_impl)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, mask, return_probs=False):
        a, probs = self.attn(self.attn_norm(x), mask, return_probs)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return x, probs


def run_layers(layers: nn.ModuleList, x, mask, output_hidden_states: bool, output_attentions: bool) -> tuple:
    """The layers in turn. Returns (x, extras): extras holds ``hidden_states`` (the layers' input, then each
    layer's output, before any final norm, as transformers records them) and ``attentions`` where asked for."""
    hidden_states, attentions = [x], []
    for layer in layers:
        x, probs = layer(x, mask, output_attentions)
        hidden_states.append(x)
        attentions.append(probs)
    extras = {}
    if output_hidden_states:
        extras["hidden_states"] = tuple(hidden_states)
    if output_attentions:
        extras["attentions"] = tuple(attentions)
    return x, extras


def all_true_mask(x: torch.Tensor) -> torch.Tensor:
    """A mask that masks nothing, (B, 1, T, T): graphs.attention fuses the probabilities into ONE op (one exported
    Attention node per layer) only when given a mask."""
    B, T, _ = x.shape
    return torch.ones(B, 1, T, T, dtype=torch.bool, device=x.device)


def check_text(input_ids, attention_mask, max_positions: int) -> None:
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}.")
    if input_ids.shape[1] > max_positions:
        raise InputError(f"input_ids have {input_ids.shape[1]} tokens but this model reads at most {max_positions} "
                         "(text_config.max_position_embeddings): truncate them (the tokenizer does with "
                         "truncation=True).")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids "
                         f"{tuple(input_ids.shape)}; they must match.")


def check_pixels(pixel_values, config: CLIPVisionConfig) -> None:
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (config.num_channels, *config.image_size):
        # The position embeddings are learned for one grid; transformers can interpolate them
        # (interpolate_pos_encoding=True), kiln cannot yet.
        want = (config.num_channels, *config.image_size)
        raise InputError(f"pixel_values have shape {tuple(pixel_values.shape)} but this model takes (batch, *{want}): "
                         f"resize images to {want[1]}x{want[2]} (the image processor does).")


class TextTransformer(nn.Module):
    """transformers' CLIPTextModel: ``last_hidden_state`` after the final LayerNorm, ``pooler_output`` its row at
    each sequence's EOS token."""

    def __init__(self, config: CLIPTextConfig, attn_impl: str):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, attn_impl) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def pool_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Each sequence's EOS position (B,). A sequence without EOS pools at position 0, as transformers' argmax."""
        if self.config.legacy_eos:  # the EOS is the highest id of the vocabulary (see CLIPTextConfig.legacy_eos)
            return input_ids.to(torch.int32).argmax(dim=-1)
        return (input_ids == self.config.eos_token_id).to(torch.int32).argmax(dim=-1)  # the first EOS

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, output_attentions=False) -> dict:
        check_text(input_ids, attention_mask, self.config.max_position_embeddings)
        B, T = input_ids.shape
        x = self.embed(input_ids) + self.position.weight[:T]  # (B, T, C)
        # Causal AND padding, folded into one bool mask expanded to (B, 1, T, T): SDPA takes one mask, and
        # onnxruntime does not broadcast the query axis.
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
        mask = mask.expand(B, 1, T, T)
        x, extras = run_layers(self.layers, x, mask, output_hidden_states, output_attentions)
        x = self.norm(x)  # (B, T, C)
        index = self.pool_index(input_ids).long()  # (B,)
        pooled = x.gather(1, index[:, None, None].expand(B, 1, x.shape[-1])).squeeze(1)  # (B, C)
        return {"last_hidden_state": x, "pooler_output": pooled, **extras}


class VisionTransformer(nn.Module):
    """transformers' CLIPVisionModel: ``last_hidden_state`` is the last layer's output (no final norm over it);
    ``pooler_output`` is the class token through ``post_layernorm``."""

    def __init__(self, config: CLIPVisionConfig, attn_impl: str):
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.patch = nn.Conv2d(config.num_channels, C, kernel_size=config.patch_size, stride=config.patch_size,
                               bias=False)
        self.cls = nn.Parameter(torch.zeros(C))
        self.position = nn.Embedding(config.sequence_length, C)
        self.pre_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(Layer(config, attn_impl) for _ in range(config.num_hidden_layers))
        self.post_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)

    def forward(self, pixel_values, output_hidden_states=False, output_attentions=False) -> dict:
        check_pixels(pixel_values, self.config)
        B = pixel_values.shape[0]
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)  # (B, T-1, C), patches in row-major order
        x = torch.cat([self.cls.expand(B, 1, -1), x], dim=1) + self.position.weight  # (B, T, C)
        x = self.pre_norm(x)
        mask = all_true_mask(x) if output_attentions else None  # images have no padding
        x, extras = run_layers(self.layers, x, mask, output_hidden_states, output_attentions)
        return {"last_hidden_state": x, "pooler_output": self.post_norm(x[:, 0]), **extras}  # (B, T, C), (B, C)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True)


class CLIPModel(SavePretrainedMixin, nn.Module):
    """transformers' CLIPModel. ``forward`` returns a dict with transformers' keys: ``logits_per_image`` (B_img,
    B_txt), ``logits_per_text`` (B_txt, B_img), ``text_embeds`` and ``image_embeds`` (L2-normalized), and
    ``text_model_output`` / ``vision_model_output`` (each tower's dict: last_hidden_state, pooler_output unprojected,
    and hidden_states / attentions on request).

    transformers 5 overwrites the towers' ``pooler_output`` with the projected features in ``text_model_output``
    and ``vision_model_output``; kiln keeps each tower's own pooled output there (as transformers 4 did and as
    CLIPTextModel / CLIPVisionModel return); the projected ones are ``get_text_features`` / ``get_image_features``."""

    task = "zero-shot-image-classification"

    def __init__(self, config: CLIPConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config.text, attn_impl)
        self.vision_model = VisionTransformer(config.vision, attn_impl)
        self.text_projection = nn.Linear(config.text.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(config.vision.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))  # a scalar, ()

    def get_text_features(self, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, P) text embeddings, projected, not normalized."""
        return self.text_projection(self.text_model(input_ids, attention_mask)["pooler_output"])

    def get_image_features(self, pixel_values) -> torch.Tensor:
        """(B, P) image embeddings, projected, not normalized."""
        return self.visual_projection(self.vision_model(pixel_values)["pooler_output"])

    def forward(self, input_ids, pixel_values, attention_mask=None, output_hidden_states=False,
                output_attentions=False) -> dict:
        text = self.text_model(input_ids, attention_mask, output_hidden_states, output_attentions)
        vision = self.vision_model(pixel_values, output_hidden_states, output_attentions)
        text_embeds = normalize(self.text_projection(text["pooler_output"]))  # (B_txt, P)
        image_embeds = normalize(self.visual_projection(vision["pooler_output"]))  # (B_img, P)
        logits_per_text = text_embeds @ image_embeds.t() * self.logit_scale.exp()  # (B_txt, B_img)
        return {"logits_per_image": logits_per_text.t(), "logits_per_text": logits_per_text,
                "text_embeds": text_embeds, "image_embeds": image_embeds,
                "text_model_output": text, "vision_model_output": vision}

    def export_graphs(self) -> dict:
        """The artifact's two graphs as modules: ``text`` and ``vision``. They return unnormalized embeddings; the
        runtime normalizes them and applies exp(``logit_scale``) (a weight, not in either graph)."""
        return {"text": TextGraph(self), "vision": VisionGraph(self)}


class TextGraph(nn.Module):
    """``input_ids``, ``attention_mask`` (B, T) -> ``text_embeds`` (B, P) unnormalized, ``last_hidden_state``."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model, self.config = model, model.config
        self.attention_nodes = model.config.text.num_hidden_layers  # one fused node per text layer

    def forward(self, input_ids, attention_mask):
        out = self.model.text_model(input_ids, attention_mask)
        return {"text_embeds": self.model.text_projection(out["pooler_output"]),
                "last_hidden_state": out["last_hidden_state"]}


class VisionGraph(nn.Module):
    """``pixel_values`` (B, Ch, Hi, Wi) -> ``image_embeds`` (B, P) unnormalized, ``last_hidden_state``."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model, self.config = model, model.config
        self.attention_nodes = model.config.vision.num_hidden_layers  # one fused node per vision layer

    def forward(self, pixel_values):
        out = self.model.vision_model(pixel_values)
        return {"image_embeds": self.model.visual_projection(out["pooler_output"]),
                "last_hidden_state": out["last_hidden_state"]}
