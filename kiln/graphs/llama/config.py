"""LLaMA-family configuration: Llama, Mistral, Qwen2, Qwen3 and SmolLM checkpoints, read from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from kiln.errors import ConfigError
from kiln.graphs.heads import read_pruned_heads
from kiln.graphs.registry import Variant

ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# The model types this family reads. Qwen2 always has q/k/v biases and no o_proj bias; the others follow
# `attention_bias` (default off). Qwen3 normalises each query and key head (RMSNorm over the head dimension, before
# RoPE) and has a 128-wide head when config.json does not say. A sliding window applies as config.json gives it
# (Llama), unless `use_sliding_window` says otherwise, which defaults to on for Mistral and off for Qwen2/Qwen3 (which
# list a window they do not use); Qwen's window applies to the layers `layer_types` marks "sliding_attention",
# by default those from `max_window_layers` (28) on, as transformers reads it.
VARIANTS = {
    "llama": Variant("Llama"),
    "mistral": Variant("Mistral", {"use_sliding_window": True}),
    "qwen2": Variant("Qwen2", {"qkv_bias": True, "use_sliding_window": False, "max_window_layers": 28}),
    "qwen3": Variant("Qwen3", {"qk_norm": True, "use_sliding_window": False, "max_window_layers": 28,
                               "defaults": {"head_dim": 128}}),
    # Phi-3 / Phi-4-mini: q, k and v in one `qkv_proj`, gate and up in one `gate_up_proj` (split on load, joined on
    # save), LongRoPE (older configs name it "su" or "yarn"), a rotated fraction of each head
    # (`partial_rotary_factor`); a sliding window, where config.json gives one, on every layer. Torch only.
    "phi3": Variant("Phi3", {"fused_projections": True, "rope_aliases": {"su": "longrope", "yarn": "longrope"},
                             "frameworks": ("torch",)}),
}
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class LlamaConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    pruned_heads: dict = field(default_factory=dict)  # layer -> query heads removed (whole grouped-query groups)
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        # transformers' names, resolved once: a config.json may leave both out (then heads share the hidden size).
        self.validate_sizes()
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @property
    def heads_per_group(self) -> int:
        """Query heads that share one key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    def heads_in_layer(self, layer: int) -> int:
        return self.num_attention_heads - len(self.pruned_heads.get(layer, ()))

    def kv_heads_in_layer(self, layer: int) -> int:
        return self.heads_in_layer(layer) // self.heads_per_group

    def inverse_frequencies(self, rope: dict | None = None) -> np.ndarray:
        """RoPE frequencies (D/2,) in float32, with linear or llama3 scaling: one definition for the torch, JAX and
        TensorFlow references, in float32 arithmetic as transformers computes them (its torch pow and NumPy's can
        round one of the D/2 values to the neighbouring float; SmolLM2's and Llama 3's sizes agree exactly).
        ``rope``: parameters other than the config's own (Gemma's local layers have theirs)."""
        rope, f32 = rope or self.rope, np.float32
        D = self.rotary_dim  # the rotated part of each head (all of it unless partial_rotary_factor says less)
        inv_freq = f32(1.0) / (f32(rope["rope_theta"]) ** (np.arange(0, D, 2).astype(f32) / f32(D)))
        if rope["rope_type"] == "longrope":  # the short factors; long_inverse_frequencies() past the original context
            inv_freq = f32(1.0) / (np.asarray(rope["short_factor"], f32) * (f32(rope["rope_theta"]) ** (
                np.arange(0, D, 2).astype(f32) / f32(D))))
        elif rope["rope_type"] == "linear":
            inv_freq = inv_freq / f32(rope["factor"])
        elif rope["rope_type"] == "llama3":
            # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
            factor, low, high = (f32(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
            context = f32(rope["original_max_position_embeddings"])
            wavelen = f32(2 * math.pi) / inv_freq
            smooth = np.clip((context / wavelen - low) / (high - low), 0, 1)
            between = (1 - smooth) * inv_freq / factor + smooth * inv_freq
            inv_freq = np.where(wavelen > context / low, inv_freq / factor,
                                np.where(wavelen < context / high, inv_freq, between))
        return inv_freq.astype(f32)

    @property
    def rotary_dim(self) -> int:
        """How many dimensions of each head RoPE rotates (the first ones): head_dim x partial_rotary_factor."""
        return int(self.head_dim * self.rope.get("partial_rotary_factor", 1.0))

    def long_inverse_frequencies(self) -> np.ndarray | None:
        """LongRoPE's frequencies with the long factors (used once a sequence passes the original context), or None
        for other RoPE types."""
        rope, f32, D = self.rope, np.float32, self.rotary_dim
        if rope["rope_type"] != "longrope":
            return None
        return (f32(1.0) / (np.asarray(rope["long_factor"], f32) * (f32(rope["rope_theta"]) ** (
            np.arange(0, D, 2).astype(f32) / f32(D))))).astype(f32)

    @property
    def rope_attention_factor(self) -> float:
        """What cos and sin are multiplied by: LongRoPE's attention factor (given, or sqrt(1 + ln(factor) /
        ln(original context)) with factor = max_position_embeddings / original context, as transformers), else 1."""
        rope = self.rope
        if rope["rope_type"] != "longrope":
            return 1.0
        if rope.get("attention_factor") is not None:
            return float(rope["attention_factor"])
        original = rope["original_max_position_embeddings"]
        factor = rope.get("factor") or self.max_position_embeddings / original
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))

    @property
    def recompute_cache_at(self) -> int | None:
        """LongRoPE: transformers' generate drops the cache and runs the whole sequence again when it first reaches
        the original context + 1 tokens, so that every key is rotated with the long factors; that context, or None."""
        return self.rope["original_max_position_embeddings"] if self.rope["rope_type"] == "longrope" else None

    @property
    def variant(self) -> Variant:
        return VARIANTS.get(self.model_type, VARIANTS["llama"])

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or bool(self.variant.get("qkv_bias"))

    @property
    def qk_norm(self) -> bool:
        """Qwen3: an RMSNorm over each query and key head before RoPE (``q_norm`` / ``k_norm``, one weight of size D)."""
        return bool(self.variant.get("qk_norm"))

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and not self.variant.get("qkv_bias")

    @classmethod
    def from_dict(cls, raw: dict) -> "LlamaConfig":
        known = {name for name in cls.__dataclass_fields__ if name not in ("raw", "rope", "pruned_heads")}
        variant = VARIANTS.get(raw.get("model_type"), VARIANTS["llama"])
        values = {**variant.get("defaults", {}), **{k: v for k, v in raw.items() if k in known and v is not None}}
        if _window(raw, variant) is None:
            values.pop("sliding_window", None)
        values["rope"] = read_rope(raw, variant.get("rope_aliases"))
        config = cls(**values, raw=dict(raw))
        config.validate()
        pruned = read_pruned_heads(raw, config.num_hidden_layers, config.num_attention_heads, config.heads_per_group)
        return dataclasses.replace(config, pruned_heads=pruned) if pruned else config

    def validate_sizes(self) -> None:
        """The sizes the derived fields are computed from (run before they are)."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config.json '{name}' must be a positive integer, got {value!r}.")
            if value > 1 << 24:
                raise ConfigError(f"config.json '{name}' = {value} is implausibly large; the file looks corrupt.")
        for name in ("num_key_value_heads", "head_dim", "sliding_window"):  # optional sizes: null or positive
            value = getattr(self, name)
            positive = isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1 << 24
            if value is not None and not positive:
                raise ConfigError(f"config.json '{name}' must be a positive integer or null, got {value!r}.")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"config.json 'hidden_size' ({self.hidden_size}) must be divisible by "
                              f"'num_attention_heads' ({self.num_attention_heads}), or give 'head_dim'.")

    def validate(self) -> None:
        self.validate_sizes()
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"config.json 'num_attention_heads' ({self.num_attention_heads}) must be a multiple of "
                              f"'num_key_value_heads' ({self.num_key_value_heads}).")
        if self.head_dim % 2 or self.rotary_dim % 2 or self.rotary_dim < 2:
            raise ConfigError(f"RoPE rotates {self.rotary_dim} of the head's {self.head_dim} dimensions "
                              "(head_dim x partial_rotary_factor): it needs an even number, 2 at least.")
        if self.rope["rope_type"] == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(self.rope[key]) != self.rotary_dim // 2:
                    raise ConfigError(f"LongRoPE's {key} has {len(self.rope[key])} values; the model rotates "
                                      f"{self.rotary_dim} dimensions per head, so it needs {self.rotary_dim // 2}.")
        if self.hidden_act not in ("silu", "swish"):
            raise ConfigError(f"config.json 'hidden_act' {self.hidden_act!r} is not supported; LLaMA-family models use 'silu'.")
        if not isinstance(self.rms_norm_eps, (int, float)) or not 0 < self.rms_norm_eps < 1:
            raise ConfigError(f"config.json 'rms_norm_eps' must be a small positive number, got {self.rms_norm_eps!r}.")
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):  # old LLaMA configs write -1 for "none"
            value = getattr(self, name)
            ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
            if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                alternatives = ", a list of them" if name == "eos_token_id" else ""
                raise ConfigError(f"config.json '{name}' must be a token id (an integer){alternatives} or null, "
                                  f"got {value!r:.200}.")

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _window(raw: dict, variant: Variant):
    """The sliding window every layer uses, or None; refuses a config whose layers differ (kiln applies one window
    to the whole model)."""
    window = raw.get("sliding_window")
    use_default = variant.get("use_sliding_window")
    if window is None or (use_default is not None and not raw.get("use_sliding_window", use_default)):
        return None
    if variant.get("max_window_layers") is None:
        return window  # Llama, Mistral: the window applies to every layer
    layers, types = raw.get("num_hidden_layers"), raw.get("layer_types")
    if not isinstance(layers, int) or isinstance(layers, bool) or not 0 < layers <= 1 << 24:
        return window  # validate_sizes names the bad layer count
    if types is None:  # layers from max_window_layers on slide
        start = raw.get("max_window_layers", variant["max_window_layers"])
        if not isinstance(start, int) or isinstance(start, bool):
            raise ConfigError(f"config.json 'max_window_layers' must be an integer, got {start!r:.100}.")
        start = min(max(start, 0), layers)
        types = ["full_attention"] * min(start, 1) + ["sliding_attention"] * min(layers - start, 1)
    elif not isinstance(types, list) or len(types) != layers or \
            any(not isinstance(t, str) or t not in LAYER_TYPES for t in types):
        raise ConfigError(f"config.json 'layer_types' must list one of {', '.join(LAYER_TYPES)} per layer "
                          f"({layers} layers), got {types!r:.200}.")
    if len(set(types)) > 1:
        which = f"layer_types {types!r:.200}" if raw.get("layer_types") is not None else \
            f"from layer max_window_layers = {raw.get('max_window_layers', variant['max_window_layers'])} on"
        raise ConfigError(f"config.json slides the attention window over some layers only ({which}); kiln applies one window to every layer of a {raw.get('model_type')} "
                          "model. Set use_sliding_window to false (as the released checkpoints do) or use transformers.")
    return window if types and types[0] == "sliding_attention" else None


def read_rope(raw: dict, aliases: dict | None = None) -> dict:
    """The RoPE parameters, from transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling` (and
    `partial_rotary_factor`, `original_max_position_embeddings` beside them); ``aliases``: older names of a RoPE
    type that a model type reads as another (Phi-3: "su" -> "longrope")."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json 'rope_parameters'/'rope_scaling' must be an object, got {params!r:.200}.")
    params = dict(params)
    params.setdefault("rope_theta", raw.get("rope_theta", params.get("rope_theta", 10000.0)))
    params.setdefault("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    rope_type = (aliases or {}).get(rope_type, rope_type) if isinstance(rope_type, str) else rope_type
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise ConfigError(f"RoPE scaling {rope_type!r} is not supported; kiln implements {', '.join(ROPE_TYPES)}.")
    params["rope_type"] = rope_type
    if rope_type not in ("default", "longrope") and "factor" not in params:
        raise ConfigError(f"RoPE scaling {rope_type!r} needs a 'factor' in config.json's rope_scaling.")
    if rope_type == "longrope":
        params.setdefault("original_max_position_embeddings", raw.get("original_max_position_embeddings"))
        for key in ("short_factor", "long_factor"):
            values = params.get(key)
            if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       and math.isfinite(v) and v > 0 for v in values):
                raise ConfigError(f"LongRoPE needs '{key}' in config.json's rope_scaling: a list of positive "
                                  f"numbers, got {values!r:.100}.")
        if params.get("attention_factor") is not None:
            value = params["attention_factor"]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"config.json 'attention_factor' must be a positive number (RoPE), got {value!r}.")
    prf = params["partial_rotary_factor"]
    if not isinstance(prf, (int, float)) or isinstance(prf, bool) or not 0 < prf <= 1:
        raise ConfigError(f"config.json 'partial_rotary_factor' must be a number in (0, 1], got {prf!r:.100}.")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in params:
                raise ConfigError(f"llama3 RoPE scaling needs {key!r} in config.json's rope_scaling.")
    for key in ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        value = params.get(key, 1)  # the keys a rope_type needs were checked above; others may be absent
        if value is None and key == "factor":
            continue  # LongRoPE without a factor: transformers derives it
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"config.json '{key}' must be a positive number (RoPE), got {value!r}.")
    return params
