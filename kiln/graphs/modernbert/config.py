"""ModernBERT configuration, read from a Hugging Face config.json as transformers reads it: its 5.x keys
(``layer_types``, ``rope_parameters`` keyed by layer type) and the older ones still in checkpoints on the hub
(``global_attn_every_n_layers``, ``global_rope_theta``, ``local_rope_theta``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kiln.errors import ConfigError
from kiln.graphs.bert.config import ACTIVATIONS
from kiln.graphs.config_fields import (check_bool, check_choice, check_eps, check_heads, check_problem_type,
                                       check_sizes, read_id2label)
from kiln.graphs.registry import Variant

VARIANTS = {"modernbert": Variant("ModernBert")}
LAYER_TYPES = ("full_attention", "sliding_attention")
# transformers' defaults where config.json names neither rope_parameters nor the older keys.
DEFAULT_THETA = {"full_attention": 160_000.0, "sliding_attention": 10_000.0}
OLD_THETA_KEYS = {"full_attention": "global_rope_theta", "sliding_attention": "local_rope_theta"}
POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class ModernBertConfig:
    model_type: str = "modernbert"
    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    norm_bias: bool = False
    pad_token_id: int = 50283
    attention_bias: bool = False
    mlp_bias: bool = False
    decoder_bias: bool = True
    classifier_pooling: str = "cls"
    classifier_bias: bool = False
    classifier_activation: str = "gelu"
    tie_word_embeddings: bool = True
    local_attention: int = 128  # the whole window of a local layer: a token sees local_attention // 2 on each side
    layer_types: tuple = ()  # per layer, "full_attention" (global) or "sliding_attention" (local)
    rope_theta: dict = field(default_factory=lambda: dict(DEFAULT_THETA))  # layer type -> RoPE base
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    problem_type: str | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # config.json as read, written back unchanged

    # What the text-encoder export layout (kiln.exporter.specs.bert_spec) reads.
    type_vocab_size = 0  # no token type embeddings: the graph takes no token_type_ids

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def heads_in_layer(self, layer: int) -> int:
        return self.num_attention_heads

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def max_sequence_length(self) -> int:
        return self.max_position_embeddings

    @property
    def sliding_window(self) -> int:
        """How far a local layer's token sees on each side (transformers' ``config.sliding_window``)."""
        return self.local_attention // 2

    @classmethod
    def from_dict(cls, raw: dict) -> "ModernBertConfig":
        derived = ("raw", "layer_types", "rope_theta", "id2label")
        known = {name for name in cls.__dataclass_fields__ if name not in derived}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        if raw.get("sliding_window") is not None:  # transformers' setter: the half window, written over local_attention
            window = raw["sliding_window"]
            if not isinstance(window, int) or isinstance(window, bool) or window < 0:
                raise ConfigError(f"config.json 'sliding_window' must be a non-negative integer, got {window!r:.100}.")
            values["local_attention"] = 2 * window
        if raw.get("pad_token_id", 0) is None:  # no padding token: exported feeds pad with id 0 (masked out anyway)
            values["pad_token_id"] = 0
        values["layer_types"] = _layer_types(raw)
        values["rope_theta"] = _rope_theta(raw)
        labels = read_id2label(raw)
        if labels is not None:
            values["id2label"] = labels
        config = cls(**values, raw=dict(raw))
        config.validate()
        return config

    def validate(self) -> None:
        check_sizes(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "max_position_embeddings", "local_attention"))
        check_heads(self.hidden_size, self.num_attention_heads)
        if self.head_dim % 2:
            raise ConfigError(f"config.json 'hidden_size' / 'num_attention_heads' = {self.head_dim} must be even: "
                              "RoPE rotates pairs of dimensions.")
        check_choice(self, "hidden_activation", ACTIVATIONS)
        check_choice(self, "classifier_activation", ACTIVATIONS)
        check_choice(self, "classifier_pooling", POOLINGS)
        check_bool(self, "norm_bias", "attention_bias", "mlp_bias", "decoder_bias", "classifier_bias",
                   "tie_word_embeddings")
        check_eps("norm_eps", self.norm_eps)
        check_problem_type(self.problem_type)
        if not self.id2label:
            raise ConfigError("config.json 'id2label' is empty; a model has at least one label.")
        pad = self.pad_token_id
        if not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad < self.vocab_size:
            raise ConfigError(f"config.json 'pad_token_id' must be a token id below vocab_size ({self.vocab_size}), "
                              f"got {pad!r:.100}.")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"config.json 'layer_types' lists {len(self.layer_types)} layers but "
                              f"'num_hidden_layers' is {self.num_hidden_layers}.")


def _layer_types(raw: dict) -> tuple:
    """config.json's ``layer_types``, or as transformers fills them in from the older ``global_attn_every_n_layers``
    (default 3): layer i is global when i is a multiple of it, local otherwise."""
    types = raw.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or any(t not in LAYER_TYPES for t in types):
            raise ConfigError(f"config.json 'layer_types' must list one of {', '.join(LAYER_TYPES)} per layer, got "
                              f"{types!r:.200}.")
        return tuple(types)
    every = raw.get("global_attn_every_n_layers", 3)
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ConfigError(f"config.json 'global_attn_every_n_layers' must be a positive integer, got {every!r:.100}.")
    layers = raw.get("num_hidden_layers", ModernBertConfig.num_hidden_layers)
    if not isinstance(layers, int) or isinstance(layers, bool) or not 0 < layers <= 1 << 24:
        return ()  # validate() names the bad layer count
    return tuple("sliding_attention" if i % every else "full_attention" for i in range(layers))


def _rope_theta(raw: dict) -> dict:
    """The RoPE base per layer type, as transformers reads it: ``rope_parameters[layer type]`` (with any older
    ``rope_scaling`` merged in), else ``global_rope_theta`` / ``local_rope_theta``, else 160k global and 10k local.
    kiln implements the default (unscaled) RoPE only."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    if not isinstance(params, dict) or (params and not set(params) <= set(LAYER_TYPES)):
        raise ConfigError(f"config.json 'rope_parameters' must map {' and '.join(LAYER_TYPES)} to RoPE parameters "
                          f"(as transformers 5 writes it for ModernBERT), got {params!r:.200}.")
    if not isinstance(scaling, dict):
        raise ConfigError(f"config.json 'rope_scaling' must be an object, got {scaling!r:.200}.")
    thetas = {}
    for layer_type in LAYER_TYPES:
        own = params.get(layer_type) or {}
        if not isinstance(own, dict):
            raise ConfigError(f"config.json 'rope_parameters'['{layer_type}'] must be an object, got {own!r:.200}.")
        merged = {**own, **scaling}
        rope_type = merged.get("rope_type", merged.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"RoPE type {rope_type!r:.100} ({layer_type} layers) is not supported for ModernBERT; "
                              "kiln implements 'default' RoPE only.")
        theta = merged.get("rope_theta", raw.get(OLD_THETA_KEYS[layer_type], DEFAULT_THETA[layer_type]))
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not math.isfinite(theta) or theta <= 0:
            name = "rope_parameters.rope_theta" if "rope_theta" in merged else OLD_THETA_KEYS[layer_type]
            raise ConfigError(f"config.json '{name}' ({layer_type} layers) must be a positive number, got "
                              f"{theta!r:.100}.")
        thetas[layer_type] = float(theta)
    return thetas
