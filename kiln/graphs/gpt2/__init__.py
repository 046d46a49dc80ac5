"""GPT-2 (model_type "gpt2"): openai-community/gpt2 and its sizes, DistilGPT2, and checkpoints fine-tuned from them."""

from __future__ import annotations

from kiln.graphs.gpt2 import weights
from kiln.graphs.gpt2.config import VARIANTS, GPT2Config
from kiln.graphs.registry import Architecture

ARCHITECTURE = Architecture(
    family="gpt2",
    config=GPT2Config,
    weights=weights,
    variants=VARIANTS,
    tasks={"text-generation": ("GPT2LMHeadModel", "LMHeadModel")},
    spec="decoder",
    description="decoders with learned positions",
)
