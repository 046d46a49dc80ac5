"""LLaMA family: Llama, Mistral, Qwen2, Qwen3 and SmolLM checkpoints (RoPE, GQA, RMSNorm, SwiGLU, KV cache)."""

from __future__ import annotations

from kiln.graphs.llama import weights
from kiln.graphs.llama.config import VARIANTS, LlamaConfig
from kiln.graphs.registry import Architecture

ARCHITECTURE = Architecture(
    family="llama",
    config=LlamaConfig,
    weights=weights,
    variants=VARIANTS,
    tasks={"text-generation": ("LlamaForCausalLM", "ForCausalLM")},
    spec="decoder",
    frameworks=("torch", "jax", "tf"),
    formats=("safetensors", "pytorch", "gguf"),
    description="decoders with rotary positions and grouped-query attention",
)
