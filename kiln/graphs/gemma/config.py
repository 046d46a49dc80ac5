"""Gemma-family configuration: Gemma 2 and Gemma 3 (text) checkpoints, read from a Hugging Face config.json as
transformers reads it (its 5.x keys and the older ones)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from kiln.errors import ConfigError
from kiln.graphs.heads import read_pruned_heads
from kiln.graphs.llama.config import LAYER_TYPES, LlamaConfig, read_rope
from kiln.graphs.registry import Variant

# How the model types differ. Gemma 2 alternates local (sliding-window) and global layers, local first, and caps
# attention and final logits (50 and 30 unless config.json says otherwise, null included); Gemma 3 has one global
# layer in every `sliding_window_pattern` (6), RMSNorms each query and key head, and gives local layers their own RoPE
# base (`rope_local_base_freq`, 10k; global 1M), with RoPE scaling for the global ones only. transformers' Gemma 3
# reads `attn_logit_softcapping` but never applies it (the released checkpoints set it null): kiln does the same.
VARIANTS = {
    "gemma2": Variant("Gemma2", {"pattern": 2, "softcaps": (50.0, 30.0), "rope_theta": 10_000.0,
                                 "attention_softcap": True}),
    "gemma3_text": Variant("Gemma3", {"pattern": 6, "qk_norm": True, "softcaps": (None, None),
                                      "rope_theta": 1_000_000.0, "local_rope_theta": 10_000.0}),
}
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")  # GeGLU with tanh GELU, as every released Gemma


@dataclass(frozen=True)
class GemmaConfig(LlamaConfig):
    """A LlamaConfig (sizes, heads, RoPE, token ids) plus what Gemma adds. ``sliding_window`` is the window of the
    layers ``layer_types`` marks "sliding_attention"; ``local_rope`` their RoPE parameters."""

    model_type: str = "gemma3_text"
    hidden_activation: str = "gelu_pytorch_tanh"
    head_dim: int | None = 256
    tie_word_embeddings: bool = True
    query_pre_attn_scalar: float = 256
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    layer_types: tuple = ()
    local_rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})

    @property
    def variant(self) -> Variant:
        return VARIANTS[self.model_type]

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return bool(self.variant.get("qk_norm"))

    @property
    def attention_softcap(self) -> float:
        """The cap on attention scores the model applies (0: none)."""
        return (self.attn_logit_softcapping or 0.0) if self.variant.get("attention_softcap") else 0.0

    def sliding(self, layer: int) -> bool:
        """Whether ``layer`` attends within the sliding window (a local layer)."""
        return self.sliding_window is not None and self.layer_types[layer] == "sliding_attention"

    def cache_window(self, layer: int) -> int | None:
        """How many past keys and values ``layer`` keeps for the next step: a local layer's next query sees itself
        and ``sliding_window - 1`` keys before it, so that many (as transformers' sliding-window cache keeps);
        None for a global layer (all of them)."""
        return self.sliding_window - 1 if self.sliding(layer) else None

    @classmethod
    def from_dict(cls, raw: dict) -> "GemmaConfig":
        variant = VARIANTS.get(raw.get("model_type"), VARIANTS["gemma3_text"])
        if raw.get("use_bidirectional_attention"):
            raise ConfigError("config.json sets use_bidirectional_attention (an embedding model such as "
                              "EmbeddingGemma): kiln reads Gemma as a causal decoder only. Use transformers or "
                              "sentence-transformers for it.")
        # hidden_act is left at LlamaConfig's default: transformers reads Gemma's activation from hidden_activation
        known = {name for name in cls.__dataclass_fields__
                 if name not in ("raw", "rope", "local_rope", "pruned_heads", "layer_types", "hidden_act")}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        attn_cap, final_cap = variant["softcaps"]  # absent -> the variant's default; null -> none
        values["attn_logit_softcapping"] = raw.get("attn_logit_softcapping", attn_cap)
        values["final_logit_softcapping"] = raw.get("final_logit_softcapping", final_cap)
        values["rope"], values["local_rope"] = _ropes(raw, variant)
        values["layer_types"] = _layer_types(raw, variant)
        config = cls(**values, raw=dict(raw))
        config.validate()
        pruned = read_pruned_heads(raw, config.num_hidden_layers, config.num_attention_heads, config.heads_per_group)
        return dataclasses.replace(config, pruned_heads=pruned) if pruned else config

    def validate(self) -> None:
        if self.hidden_activation not in ACTIVATIONS:
            raise ConfigError(f"config.json 'hidden_activation' {self.hidden_activation!r} is not supported; Gemma "
                              f"models use {' or '.join(ACTIVATIONS)}.")
        super().validate()
        for name, nullable in (("query_pre_attn_scalar", False), ("attn_logit_softcapping", True),
                               ("final_logit_softcapping", True)):
            value = getattr(self, name)
            if value is None and nullable:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"config.json '{name}' must be a positive number{' or null' if nullable else ''}, "
                                  f"got {value!r:.100}.")


def _layer_types(raw: dict, variant: Variant) -> tuple:
    """Per layer "sliding_attention" or "full_attention": config.json's `layer_types`, or every `pattern`-th layer
    global (`sliding_window_pattern` in older Gemma 3 configs), as transformers fills them in."""
    layers, types = raw.get("num_hidden_layers"), raw.get("layer_types")
    if not isinstance(layers, int) or isinstance(layers, bool) or not 0 < layers <= 1 << 24:
        return ()  # validate_sizes names the bad layer count
    if types is None:
        pattern = raw.get("sliding_window_pattern", variant["pattern"])
        if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
            raise ConfigError(f"config.json 'sliding_window_pattern' must be a positive integer, got {pattern!r:.100}.")
        return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers))
    if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"config.json 'layer_types' must list one of {', '.join(LAYER_TYPES)} per layer "
                          f"({layers} layers), got {types!r:.200}.")
    return tuple(types)


def _ropes(raw: dict, variant: Variant) -> tuple[dict, dict]:
    """(global, local) RoPE parameters: transformers 5's `rope_parameters` keyed by layer type, or one set for every
    layer, or the older `rope_theta` + `rope_scaling` (global) and `rope_local_base_freq` (local)."""
    params = raw.get("rope_parameters")
    theta, local_theta = variant["rope_theta"], variant.get("local_rope_theta")
    if isinstance(params, dict) and set(params) & set(LAYER_TYPES):
        full = read_rope({"rope_parameters": params.get("full_attention") or {}, "rope_theta": theta})
        local = read_rope({"rope_parameters": params.get("sliding_attention") or {},
                           "rope_theta": local_theta or theta})
        return full, local
    full = read_rope({**raw, "rope_theta": raw.get("rope_theta", theta)})
    if local_theta is None:  # Gemma 2: one RoPE for every layer
        return full, full
    local = read_rope({"rope_theta": raw.get("rope_local_base_freq", local_theta)})
    return full, local
