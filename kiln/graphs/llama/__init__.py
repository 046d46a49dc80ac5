"""LLaMA family: Llama, Mistral, Qwen2 and SmolLM checkpoints (RoPE, GQA, RMSNorm, SwiGLU, KV cache)."""

from __future__ import annotations

from kiln.graphs.llama import weights
from kiln.graphs.llama.config import LlamaConfig

TASKS = ("text-generation",)


def build(raw_config: dict, task: str, hf_state: dict, attn_impl: str = "sdpa"):
    from kiln.graphs.checkpoint import attach_weights
    from kiln.graphs.llama.model_torch import LlamaForCausalLM

    config = LlamaConfig.from_dict(raw_config)
    state, unused = weights.hf_to_kiln(hf_state, config, task)
    model = LlamaForCausalLM(config, attn_impl=attn_impl)
    return attach_weights(model, weights, state, unused, task)
