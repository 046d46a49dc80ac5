"""CLIP configuration, read from a Hugging Face config.json (model_type "clip").

A CLIP config nests two encoders: ``text_config`` and ``vision_config``, each a dict that may lack keys (transformers
fills them with its defaults, as these dataclasses do). Errors name a nested field as config.json spells it, e.g.
``text_config.hidden_size``. The helpers at the top are shared with the SigLIP family (``kiln.graphs.siglip.config``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from types import SimpleNamespace
from typing import ClassVar

from kiln.errors import ConfigError
from kiln.graphs.config_fields import check_choice, check_eps, check_sizes
from kiln.graphs.registry import Variant

# transformers' ACT2FN names that kiln's references compute (graphs.clip.model_torch.ACT).
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish", "tanh")

VARIANTS = {"clip": Variant("CLIP")}  # the model types this family reads


def pair(value, name: str) -> tuple[int, int]:
    """Copied from graphs.vit.config._pair: an int (square) or a (height, width) pair -> (height, width)."""
    p = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
    if len(p) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16 for v in p):
        raise ConfigError(f"config.json '{name}' must be a positive integer or a [height, width] pair, got {value!r}.")
    return p


def named_fields(section: str, config, names: tuple[str, ...]) -> SimpleNamespace:
    """``config``'s fields under their config.json names (``text_config.hidden_size``), so that the shared checks in
    graphs.config_fields, which name the attribute they read, name the nested field."""
    return SimpleNamespace(**{f"{section}.{name}": getattr(config, name) for name in names})


def read_section(cls, raw: dict, key: str, override: dict | None = None):
    """One sub-config (``cls``) from ``raw[key]``: keys it does not model are ignored, and a null keeps the default
    except where ``cls.NULLABLE`` says null is a value (transformers would keep a null size and fail on it).
    ``override`` is a legacy ``text_config_dict``-style dict: transformers then builds the section from it alone,
    defaults filled in."""
    name, section = (key, raw.get(key)) if override is None else (f"{key}_dict", override)
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"config.json '{name}' must be an object (a dict of the {key} settings), got "
                          f"{type(section).__name__}.")
    known = {f.name for f in fields(cls)}
    values = {k: v for k, v in section.items() if k in known and (v is not None or k in cls.NULLABLE)}
    for name in ("image_size", "patch_size"):
        if name in values:
            values[name] = pair(values[name], f"{key}.{name}")
    return cls(**values)


def vision_dict(config) -> dict:
    """A vision sub-config as config.json spells it: square sizes as one int (transformers' CLIP and SigLIP
    embeddings compute with ``image_size // patch_size`` and cannot take a pair)."""
    out = asdict(config)
    for name in ("image_size", "patch_size"):
        height, width = out[name]
        out[name] = height if height == width else [height, width]
    return out


def validate_encoder(config, section: str) -> None:
    """What every text and vision tower must satisfy: sizes, heads dividing the width, epsilon, activation."""
    ints = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    named = named_fields(section, config, ints + ("hidden_act",))
    check_sizes(named, tuple(f"{section}.{n}" for n in ints))
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(f"config.json '{section}.hidden_size' ({config.hidden_size}) must be divisible by "
                          f"'{section}.num_attention_heads' ({config.num_attention_heads}).")
    check_choice(named, f"{section}.hidden_act", ACTIVATIONS)
    check_eps(f"{section}.layer_norm_eps", config.layer_norm_eps)


def validate_vision(config, section: str = "vision_config") -> None:
    """A vision tower: the encoder checks, channels, and an image that holds at least one patch."""
    validate_encoder(config, section)
    check_sizes(named_fields(section, config, ("num_channels",)), (f"{section}.num_channels",))
    for name in ("image_size", "patch_size"):
        pair(getattr(config, name), f"{section}.{name}")
    if min(config.grid) < 1:
        raise ConfigError(f"config.json '{section}.patch_size' {list(config.patch_size)} is larger than "
                          f"'{section}.image_size' {list(config.image_size)}; the image must hold at least one patch.")


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def validate_text(config, section: str = "text_config") -> None:
    """A text tower: the encoder checks, the vocabulary and positions, integer (or null) special token ids."""
    validate_encoder(config, section)
    check_sizes(named_fields(section, config, ("vocab_size", "max_position_embeddings")),
                (f"{section}.vocab_size", f"{section}.max_position_embeddings"))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, name)
        # transformers allows a list of EOS ids; CLIP's own check (CLIPTextConfig.validate) wants one.
        ok = value is None or _is_token_id(value) or (name == "eos_token_id" and isinstance(value, list)
                                                     and all(_is_token_id(v) for v in value))
        if not ok:
            raise ConfigError(f"config.json '{section}.{name}' must be a token id (an integer >= 0) or null, "
                              f"got {value!r}.")


@dataclass(frozen=True)
class CLIPTextConfig:
    """The text tower (transformers' CLIPTextConfig defaults: openai/clip-vit-base-patch32)."""

    SECTION: ClassVar[str] = "text_config"
    NULLABLE: ClassVar[tuple[str, ...]] = ("pad_token_id", "bos_token_id")
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77  # the longest token sequence; kiln's graphs take up to this many
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1  # what config.json says; CLIP's tokenizer pads with its own pad token (often EOS)
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407  # pooling reads the first EOS; 2 (configs before transformers 4.31) means argmax(ids)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def legacy_eos(self) -> bool:
        """True for eos_token_id == 2, a wrong id older configs carry: transformers then pools each sequence at its
        highest token id (CLIP's EOS is the last id of its vocabulary), and so does kiln."""
        return self.eos_token_id == 2

    def validate(self) -> None:
        validate_text(self, self.SECTION)
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ConfigError(f"config.json '{self.SECTION}.eos_token_id' must be one token id: CLIP pools each "
                              f"sequence at its EOS token. Got {self.eos_token_id!r}.")


class PatchGrid:
    """The sizes a vision tower's config derives (CLIP's and SigLIP's): head width, patch grid, patch count."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row; the strided conv drops any remainder, as transformers does."""
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class CLIPVisionConfig(PatchGrid):
    """The vision tower (transformers' CLIPVisionConfig defaults). transformers itself takes square images only
    (an int image_size); kiln reads a [height, width] pair as well."""

    SECTION: ClassVar[str] = "vision_config"
    NULLABLE: ClassVar[tuple[str, ...]] = ()
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: tuple[int, int] = (224, 224)  # (height, width)
    patch_size: tuple[int, int] = (32, 32)  # (height, width)
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


    @property
    def sequence_length(self) -> int:
        """Tokens per image: the class token and one per patch (kiln does not interpolate positions)."""
        return 1 + self.num_patches

    def validate(self) -> None:
        validate_vision(self, self.SECTION)


@dataclass(frozen=True)
class CLIPConfig:
    """A CLIP checkpoint: two towers, each projected (without bias) to ``projection_dim``, and a learned temperature.

    For the exporter: ``projection_dim`` is the width of ``text_embeds`` and ``image_embeds``;
    ``logit_scale_init_value`` is only the temperature training started from: the trained one is the weight
    ``logit_scale`` (the model's ``logit_scale`` parameter; logits = exp(logit_scale) * cosine)."""

    model_type: str = "clip"
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # config.json as read, written back unchanged

    def __post_init__(self):
        if not self.raw:  # built in code: keep config.json's spelling, so that save_pretrained writes a loadable file
            object.__setattr__(self, "raw", self.to_hf_dict())

    def to_hf_dict(self) -> dict:
        """config.json as transformers spells it (nested text_config / vision_config)."""
        return {"model_type": self.model_type, "text_config": asdict(self.text),
                "vision_config": vision_dict(self.vision), "projection_dim": self.projection_dim,
                "logit_scale_init_value": self.logit_scale_init_value}

    @classmethod
    def from_dict(cls, raw: dict) -> "CLIPConfig":
        # Older transformers wrote text_config_dict / vision_config_dict; where present, transformers builds the
        # section from that dict and its own defaults, overriding text_config / vision_config: so does kiln.
        text = read_section(CLIPTextConfig, raw, "text_config", raw.get("text_config_dict"))
        vision = read_section(CLIPVisionConfig, raw, "vision_config", raw.get("vision_config_dict"))
        values = {k: raw[k] for k in ("projection_dim", "logit_scale_init_value") if raw.get(k) is not None}
        config = cls(model_type=raw.get("model_type", "clip"), text=text, vision=vision, **values, raw=dict(raw))
        config.validate()
        return config

    def validate(self) -> None:
        self.text.validate()
        self.vision.validate()
        check_sizes(self, ("projection_dim",))
        value = self.logit_scale_init_value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config.json 'logit_scale_init_value' must be a number, got {value!r}.")

