"""SigLIP configuration, read from a Hugging Face config.json (model_type "siglip": SigLIP, and SigLIP 2's
fixed-resolution checkpoints, which transformers also loads as SiglipModel).

Like CLIP's, the config nests ``text_config`` and ``vision_config``; the readers and checks are CLIP's
(``graphs.clip.config``). SigLIP has no projection layers: the text tower ends in a linear ``head`` to
``text_config.projection_size`` (default: the text width; SigLIP 2 giant sets it to the vision width), the vision
tower in an attention-pooling head, and the two pooled vectors must be the same width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

from kiln.errors import ConfigError
from kiln.graphs.clip.config import PatchGrid, named_fields, read_section, validate_text, validate_vision, vision_dict
from kiln.graphs.config_fields import check_sizes
from kiln.graphs.registry import Variant

VARIANTS = {"siglip": Variant("Siglip")}  # the model types this family reads


@dataclass(frozen=True)
class SiglipTextConfig:
    """The text tower (transformers' SiglipTextConfig defaults: google/siglip-base-patch16-224)."""

    SECTION: ClassVar[str] = "text_config"
    NULLABLE: ClassVar[tuple[str, ...]] = ("pad_token_id", "bos_token_id", "eos_token_id")
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64  # SigLIP's processor pads every text to this length (padding="max_length")
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | list[int] | None = 49407  # unused by the model: it pools the last position
    projection_size: int | None = None  # the head's output width; None: hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def output_size(self) -> int:
        """The width of the pooled (head) output, ``text_embeds``."""
        return self.projection_size if self.projection_size is not None else self.hidden_size

    def validate(self) -> None:
        validate_text(self, self.SECTION)
        if self.projection_size is not None:
            check_sizes(named_fields(self.SECTION, self, ("projection_size",)), (f"{self.SECTION}.projection_size",))


@dataclass(frozen=True)
class SiglipVisionConfig(PatchGrid):
    """The vision tower (transformers' SiglipVisionConfig defaults). No class token: one position per patch."""

    SECTION: ClassVar[str] = "vision_config"
    NULLABLE: ClassVar[tuple[str, ...]] = ()
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: tuple[int, int] = (224, 224)  # (height, width)
    patch_size: tuple[int, int] = (16, 16)  # (height, width)
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True  # the attention-pooling head; SiglipModel needs it


    @property
    def sequence_length(self) -> int:
        """Tokens per image: one per patch (SigLIP has no class token)."""
        return self.num_patches

    def validate(self) -> None:
        validate_vision(self, self.SECTION)
        if self.vision_use_head is not True:
            raise ConfigError(f"config.json '{self.SECTION}.vision_use_head' is {self.vision_use_head!r}: without its "
                              "attention-pooling head the vision tower gives no image embedding, and SiglipModel "
                              "cannot score images (such a tower is a backbone, e.g. PaliGemma's).")


@dataclass(frozen=True)
class SiglipConfig:
    """A SigLIP checkpoint. For the exporter: ``projection_dim`` is the width of ``text_embeds`` and
    ``image_embeds``; the logits are exp(``logit_scale``) * cosine + ``logit_bias``, both weights of the model
    (``logit_scale_init_value`` is transformers' initial value, 0, not the trained one)."""

    model_type: str = "siglip"
    text: SiglipTextConfig = field(default_factory=SiglipTextConfig)
    vision: SiglipVisionConfig = field(default_factory=SiglipVisionConfig)
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # config.json as read, written back unchanged

    logit_scale_init_value: ClassVar[float] = 0.0  # transformers zero-initializes logit_scale and logit_bias

    def __post_init__(self):
        if not self.raw:  # built in code: keep config.json's spelling, so that save_pretrained writes a loadable file
            object.__setattr__(self, "raw", self.to_hf_dict())

    @property
    def projection_dim(self) -> int:
        return self.vision.hidden_size

    def to_hf_dict(self) -> dict:
        """config.json as transformers spells it (nested text_config / vision_config)."""
        return {"model_type": self.model_type, "text_config": asdict(self.text),
                "vision_config": vision_dict(self.vision)}

    @classmethod
    def from_dict(cls, raw: dict) -> "SiglipConfig":
        text = read_section(SiglipTextConfig, raw, "text_config")
        vision = read_section(SiglipVisionConfig, raw, "vision_config")
        config = cls(model_type=raw.get("model_type", "siglip"), text=text, vision=vision, raw=dict(raw))
        config.validate()
        return config

    def validate(self) -> None:
        self.text.validate()
        self.vision.validate()
        if self.text.output_size != self.vision.hidden_size:
            raise ConfigError(f"config.json 'text_config.projection_size' ({self.text.output_size}, default: "
                              f"text_config.hidden_size) must equal 'vision_config.hidden_size' "
                              f"({self.vision.hidden_size}): SigLIP compares the two embeddings directly.")

