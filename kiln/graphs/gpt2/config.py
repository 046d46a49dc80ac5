"""GPT-2 configuration, read from a Hugging Face config.json (model_type "gpt2").

Fields keep GPT-2's own names (``n_embd``, ``n_layer``, ``n_head``, ``n_positions``), so ``save_pretrained`` writes a
config.json transformers reads back; the properties give the generic names the exporter reads (``num_hidden_layers``,
``num_key_value_heads``, ``head_dim``, ``max_position_embeddings``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.errors import ConfigError
from kiln.graphs.registry import Variant

# transformers' GPT2Config.attribute_map: a config.json written with the generic names means the same thing.
ALIASES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
           "max_position_embeddings": "n_positions"}
# activation_function -> torch.nn.functional.gelu's `approximate` ("tanh" | "none"), or another function's name.
# gelu_new, gelu_fast and gelu_pytorch_tanh are the same tanh formula written three ways (equal to ~1e-7).
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
               "relu": "relu", "silu": "silu", "swish": "silu"}


VARIANTS = {"gpt2": Variant("GPT2")}  # the model types this family reads


@dataclass(frozen=True)
class GPT2Config:
    model_type: str = "gpt2"
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    # Training-time numerics (fp32 QK and softmax under autocast); in the fp32 reference it changes nothing.
    reorder_and_upcast_attn: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list | None = 50256
    pad_token_id: int | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    # The generic names the exporter and the shared code read.
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_key_value_heads(self) -> int:  # GPT-2 has no grouped-query attention
        return self.n_head

    @property
    def head_dim(self) -> int:  # per-head size
        return self.n_embd // self.n_head

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def intermediate_size(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def attention_scale(self, layer: int) -> float:
        """The factor on q.k for layer ``layer`` (0-based), as transformers' GPT2Attention.scaling."""
        scale = self.head_dim ** -0.5 if self.scale_attn_weights else 1.0
        return scale / (layer + 1) if self.scale_attn_by_inverse_layer_idx else scale

    @classmethod
    def from_dict(cls, raw: dict) -> "GPT2Config":
        raw_named = {ALIASES.get(k, k): v for k, v in raw.items() if k in ALIASES and ALIASES[k] not in raw} | raw
        known = {name for name in cls.__dataclass_fields__ if name != "raw"}
        # null means "the default", except for token ids, where null means "none" (as transformers reads them).
        values = {k: v for k, v in raw_named.items() if k in known and (v is not None or k.endswith("_token_id"))}
        config = cls(**values, raw=dict(raw))
        config.validate()
        return config

    def validate(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config.json '{name}' must be a positive integer, got {value!r}.")
            if value > 1 << 24:
                raise ConfigError(f"config.json '{name}' = {value} is implausibly large; the file looks corrupt.")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or isinstance(self.n_inner, bool)
                                         or self.n_inner <= 0):
            raise ConfigError(f"config.json 'n_inner' must be a positive integer or null, got {self.n_inner!r}.")
        if self.n_embd % self.n_head:
            raise ConfigError(f"config.json 'n_embd' ({self.n_embd}) must be divisible by 'n_head' ({self.n_head}).")
        if not isinstance(self.activation_function, str) or self.activation_function not in ACTIVATIONS:
            raise ConfigError(f"config.json 'activation_function' {self.activation_function!r} is not supported; "
                              f"kiln implements {', '.join(ACTIVATIONS)}.")
        if not isinstance(self.layer_norm_epsilon, (int, float)) or not 0 < self.layer_norm_epsilon < 1:
            raise ConfigError("config.json 'layer_norm_epsilon' must be a small positive number, "
                              f"got {self.layer_norm_epsilon!r}.")
        if self.add_cross_attention:
            raise ConfigError("config.json sets 'add_cross_attention': this GPT-2 is the decoder of an encoder-decoder "
                              "model, which kiln does not export. Export a plain GPT-2 (add_cross_attention false).")
