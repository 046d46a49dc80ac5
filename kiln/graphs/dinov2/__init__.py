"""DINOv2: facebook/dinov2-* self-supervised image encoders and the classifiers trained on them (model_type
"dinov2")."""

from __future__ import annotations

from kiln.graphs.dinov2 import weights
from kiln.graphs.dinov2.config import VARIANTS, Dinov2Config
from kiln.graphs.registry import Architecture

ARCHITECTURE = Architecture(
    family="dinov2",
    config=Dinov2Config,
    weights=weights,
    variants=VARIANTS,
    tasks={
        "feature-extraction": ("Dinov2Model", "Model"),
        "image-classification": ("Dinov2ForImageClassification", "ForImageClassification"),
    },
    spec="vision-encoder",
    description="self-supervised image embeddings and image classifiers",
)
