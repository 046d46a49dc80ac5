"""LLaMA family: Llama, Mistral, Qwen2 and SmolLM checkpoints (RoPE, GQA, RMSNorm, SwiGLU, KV cache)."""

from __future__ import annotations

import importlib

from kiln.graphs.llama import weights
from kiln.graphs.llama.config import LlamaConfig

TASKS = ("text-generation",)
# Sibling references with the same classes and parameter names: model_torch.py, model_jax.py, model_tf.py.
FRAMEWORKS = ("torch", "jax", "tf")


def build(raw_config: dict, task: str, hf_state: dict, attn_impl: str = "sdpa", framework: str = "torch"):
    from kiln.graphs.checkpoint import attach_weights

    models = importlib.import_module(f"kiln.graphs.llama.model_{framework}")
    config = LlamaConfig.from_dict(raw_config)
    state, unused = weights.hf_to_kiln(hf_state, config, task)
    model = models.LlamaForCausalLM(config, attn_impl=attn_impl)
    return attach_weights(model, weights, state, unused, task)
