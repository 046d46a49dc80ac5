"""Vision Transformer (ViT): google/vit-* and checkpoints fine-tuned from them (model_type "vit")."""

from __future__ import annotations

from kiln.graphs.registry import Architecture
from kiln.graphs.vit import weights
from kiln.graphs.vit.config import VARIANTS, ViTConfig

ARCHITECTURE = Architecture(
    family="vit",
    config=ViTConfig,
    weights=weights,
    variants=VARIANTS,
    tasks={
        "image-classification": ("ViTForImageClassification", "ForImageClassification"),
        "feature-extraction": ("ViTModel", "Model"),
    },
    spec="vision-encoder",
    pooler="pooler.weight",
    description="image classifiers and image embeddings",
)
