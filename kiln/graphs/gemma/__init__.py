"""Gemma family: Gemma 2 and Gemma 3 (text) checkpoints (GeGLU, four norms per layer, local and global layers,
soft-capping, tied embeddings)."""

from __future__ import annotations

from kiln.graphs.gemma import weights
from kiln.graphs.gemma.config import VARIANTS, GemmaConfig
from kiln.graphs.registry import Architecture

ARCHITECTURE = Architecture(
    family="gemma",
    config=GemmaConfig,
    weights=weights,
    variants=VARIANTS,
    tasks={"text-generation": ("GemmaForCausalLM", "ForCausalLM")},
    spec="decoder",
    frameworks=("torch",),
    formats=("safetensors", "pytorch", "gguf"),
    description="decoders with local and global layers, GeGLU and soft-capping",
)
