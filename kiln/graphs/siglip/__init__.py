"""SigLIP: google/siglip-* and SigLIP 2's fixed-resolution google/siglip2-* (model_type "siglip"), a text and a
vision encoder scored by a sigmoid, for zero-shot image classification and retrieval."""

from __future__ import annotations

from kiln.graphs.registry import Architecture
from kiln.graphs.siglip import weights
from kiln.graphs.siglip.config import VARIANTS, SiglipConfig

ARCHITECTURE = Architecture(
    family="siglip",
    config=SiglipConfig,
    weights=weights,
    variants=VARIANTS,
    tasks={"zero-shot-image-classification": ("SiglipModel", "Model")},
    spec="dual-encoder",
    description="zero-shot image classification and text/image embeddings (sigmoid scores)",
)
