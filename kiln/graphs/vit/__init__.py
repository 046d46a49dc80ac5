"""Vision Transformer (ViT): google/vit-* and checkpoints fine-tuned from them (model_type "vit")."""

from __future__ import annotations

from kiln.graphs.vit import weights
from kiln.graphs.vit.config import ViTConfig

TASKS = ("image-classification", "feature-extraction")


FRAMEWORKS = ("torch",)  # no JAX/TensorFlow sibling yet


def build(raw_config: dict, task: str, hf_state: dict, attn_impl: str = "sdpa", framework: str = "torch"):
    """The torch reference for ``task`` with the checkpoint's weights loaded and checked."""
    from kiln.errors import ConfigError
    from kiln.graphs.checkpoint import attach_weights
    from kiln.graphs.vit.model_torch import TASK_MODELS, ViTModel

    config = ViTConfig.from_dict(raw_config)
    state, unused = weights.hf_to_kiln(hf_state, config, task)
    if task == "feature-extraction":
        model = ViTModel(config, add_pooler="pooler.weight" in state, attn_impl=attn_impl)
    else:
        if config.num_labels < 1:
            raise ConfigError("config.json has no labels (empty 'id2label'); image-classification needs at least one. "
                              "Export with --task feature-extraction for the image embeddings instead.")
        model = TASK_MODELS[task](config, attn_impl=attn_impl)
    return attach_weights(model, weights, state, unused, task)
