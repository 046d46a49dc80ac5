"""Vision Transformer (ViT) configuration, read from a Hugging Face config.json."""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.errors import ConfigError
from kiln.graphs.config_fields import check_eps, check_problem_type, read_id2label
from kiln.graphs.registry import Variant

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish", "tanh")


def _pair(value, name: str) -> tuple[int, int]:
    """transformers takes ``image_size``/``patch_size`` as an int (square) or a (height, width) pair."""
    pair = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16 for v in pair):
        raise ConfigError(f"config.json '{name}' must be a positive integer or a [height, width] pair, got {value!r}.")
    return pair


VARIANTS = {"vit": Variant("ViT")}  # the model types this family reads


@dataclass(frozen=True)
class ViTConfig:
    model_type: str = "vit"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: tuple[int, int] = (224, 224)  # (height, width)
    patch_size: tuple[int, int] = (16, 16)  # (height, width)
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_output_size: int | None = None  # None: hidden_size, as transformers
    pooler_act: str = "tanh"
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    problem_type: str | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # config.json as read, written back unchanged

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row; the strided conv drops any remainder, as transformers does."""
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def sequence_length(self) -> int:
        """Tokens per image: the CLS token and one per patch. Fixed, since kiln does not interpolate positions."""
        return 1 + self.grid[0] * self.grid[1]

    @property
    def pooler_size(self) -> int:
        return self.pooler_output_size or self.hidden_size

    @classmethod
    def from_dict(cls, raw: dict) -> "ViTConfig":
        known = {name for name in cls.__dataclass_fields__ if name != "raw"}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        for name in ("image_size", "patch_size"):
            if name in values:
                values[name] = _pair(values[name], name)
        labels = read_id2label(raw, example="cat")
        if labels is not None:
            values["id2label"] = labels
        config = cls(**values, raw=dict(raw))
        config.validate()
        return config

    def validate(self) -> None:
        ints = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config.json '{name}' must be a positive integer, got {value!r}.")
            if value > 1 << 24:
                raise ConfigError(f"config.json '{name}' = {value} is implausibly large; the file looks corrupt.")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"config.json 'hidden_size' ({self.hidden_size}) must be divisible by "
                              f"'num_attention_heads' ({self.num_attention_heads}).")
        for name in ("image_size", "patch_size"):
            _pair(getattr(self, name), name)
        if min(self.grid) < 1:
            raise ConfigError(f"config.json 'patch_size' {list(self.patch_size)} is larger than 'image_size' "
                              f"{list(self.image_size)}; a ViT needs at least one patch.")
        for name in ("hidden_act", "pooler_act"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ConfigError(f"config.json '{name}' {getattr(self, name)!r} is not supported; "
                                  f"use one of {ACTIVATIONS}.")
        if not isinstance(self.qkv_bias, bool):
            raise ConfigError(f"config.json 'qkv_bias' must be true or false, got {self.qkv_bias!r}.")
        size = self.pooler_output_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= 1 << 24):
            raise ConfigError(f"config.json 'pooler_output_size' must be a positive integer, got {size!r}.")
        check_problem_type(self.problem_type)
        check_eps("layer_norm_eps", self.layer_norm_eps)
