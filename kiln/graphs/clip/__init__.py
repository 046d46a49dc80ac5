"""CLIP: openai/clip-vit-* and checkpoints trained like them (model_type "clip"), a text and a vision encoder
embedding into one space for zero-shot image classification and retrieval."""

from __future__ import annotations

from kiln.graphs.clip import weights
from kiln.graphs.clip.config import VARIANTS, CLIPConfig
from kiln.graphs.registry import Architecture

ARCHITECTURE = Architecture(
    family="clip",
    config=CLIPConfig,
    weights=weights,
    variants=VARIANTS,
    tasks={"zero-shot-image-classification": ("CLIPModel", "Model")},
    spec="dual-encoder",
    description="zero-shot image classification and text/image embeddings",
)
