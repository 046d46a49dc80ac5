"""DINOv2 configuration, read from a Hugging Face config.json, and the image size an export takes.

DINOv2 checkpoints say ``image_size`` 518 (the size their position embeddings were trained at), but their image
processor crops 224: the model interpolates the position embeddings to the patch grid of what it is fed. kiln exports
at one fixed image size, so ``input_size`` holds the size the image processor makes (set from
preprocessor_config.json at export, ``processed_size``), which the exporter's vision-encoder layout reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.errors import ConfigError
from kiln.graphs.config_fields import (check_bool, check_choice, check_eps, check_heads, check_problem_type,
                                       check_sizes, read_id2label)
from kiln.graphs.registry import Variant
from kiln.graphs.vit.config import ACTIVATIONS, _pair

VARIANTS = {"dinov2": Variant("Dinov2")}  # the model types this family reads


@dataclass(frozen=True)
class Dinov2Config:
    model_type: str = "dinov2"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: tuple[int, int] = (224, 224)  # (height, width) the position embeddings were learned at
    patch_size: tuple[int, int] = (14, 14)  # (height, width)
    num_channels: int = 3
    qkv_bias: bool = True
    layerscale_value: float = 1.0  # the layer scales' initial value; checkpoints hold the learned ones
    use_swiglu_ffn: bool = False  # SwiGLU MLP (dinov2-giant) instead of fc1 -> act -> fc2
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    problem_type: str | None = None
    # Not in config.json: the (height, width) of the pixel_values kiln exports for (the image processor's output);
    # None means image_size.
    input_size: tuple[int, int] | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # config.json as read, written back unchanged

    def __post_init__(self):
        if self.input_size is None:
            object.__setattr__(self, "input_size", self.image_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def intermediate_size(self) -> int:
        """The MLP's hidden width: transformers derives it from mlp_ratio (config.json has no intermediate_size)."""
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def swiglu_size(self) -> int:
        """SwiGLU keeps two thirds of the MLP width, rounded up to a multiple of 8, as transformers (and DINOv2)."""
        return (int(self.intermediate_size * 2 / 3) + 7) // 8 * 8

    @property
    def position_grid(self) -> tuple[int, int]:
        """The patch grid the position embeddings were learned for (square, from image_size)."""
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row of an exported input; the strided conv drops any remainder."""
        return self.input_size[0] // self.patch_size[0], self.input_size[1] // self.patch_size[1]

    @property
    def sequence_length(self) -> int:
        """Tokens per exported image: the CLS token and one per patch."""
        return 1 + self.grid[0] * self.grid[1]

    @property
    def pooler_size(self) -> int:
        return self.hidden_size  # pooler_output is the normed CLS token

    @classmethod
    def from_dict(cls, raw: dict) -> "Dinov2Config":
        known = {name for name in cls.__dataclass_fields__ if name not in ("raw", "input_size")}
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
        check_sizes(self, ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_channels"))
        check_heads(self.hidden_size, self.num_attention_heads)
        ratio = self.mlp_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 64 \
                or self.intermediate_size < 1:
            raise ConfigError(f"config.json 'mlp_ratio' must be a positive number (the MLP width over hidden_size), "
                              f"got {ratio!r}.")
        for name in ("image_size", "patch_size"):
            _pair(getattr(self, name), name)
        if min(self.position_grid) < 1:
            raise ConfigError(f"config.json 'patch_size' {list(self.patch_size)} is larger than 'image_size' "
                              f"{list(self.image_size)}; DINOv2 needs at least one patch.")
        if self.position_grid[0] != self.position_grid[1]:
            raise ConfigError(f"config.json 'image_size' {list(self.image_size)} and 'patch_size' "
                              f"{list(self.patch_size)} give a {self.position_grid[0]}x{self.position_grid[1]} patch "
                              "grid; DINOv2 (as transformers) interpolates its position embeddings from a square one.")
        if min(self.grid) < 1:
            raise ConfigError(f"The image size {list(self.input_size)} (preprocessor_config.json's crop or size) is "
                              f"smaller than 'patch_size' {list(self.patch_size)}; DINOv2 needs at least one patch.")
        check_choice(self, "hidden_act", ACTIVATIONS)
        check_bool(self, "qkv_bias", "use_swiglu_ffn")
        check_problem_type(self.problem_type)
        check_eps("layer_norm_eps", self.layer_norm_eps)


def processed_size(processor: dict) -> tuple[int, int] | None:
    """The (height, width) that the image processor of ``preprocessor_config.json`` (a dict) makes every image, read
    as kiln's runtime reads it (kiln.runtime.image_processor): the center crop, else a fixed resize. None when there
    is no one size (a shortest-edge resize without a crop keeps each image's aspect ratio, or no resize at all)."""
    if not isinstance(processor, dict):
        return None
    if processor.get("do_center_crop", False):
        size = processor.get("crop_size")
    elif processor.get("do_resize", True):
        size = processor.get("size", 224)
    else:
        return None
    if isinstance(size, dict):
        size = (size.get("height"), size.get("width")) if "shortest_edge" not in size else None
    try:
        return _pair(size, "crop_size" if processor.get("do_center_crop", False) else "size")
    except ConfigError:  # a shortest edge, or a form the runtime refuses with its own message
        return None
