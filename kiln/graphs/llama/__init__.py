"""LLaMA family: Llama, Mistral, Qwen2 and SmolLM checkpoints (RoPE, GQA, RMSNorm, SwiGLU, KV cache)."""

from __future__ import annotations

from kiln.graphs.llama import weights
from kiln.graphs.llama.config import LlamaConfig

TASKS = ("text-generation",)


def build(raw_config: dict, task: str, hf_state: dict, attn_impl: str = "sdpa"):
    import logging

    from kiln.graphs.checkpoint import load_weights
    from kiln.graphs.llama.model_torch import LlamaForCausalLM

    config = LlamaConfig.from_dict(raw_config)
    state, unused = weights.hf_to_kiln(hf_state, config, task)
    model = LlamaForCausalLM(config, attn_impl=attn_impl)
    if unused:
        logging.getLogger("kiln").warning("Unused checkpoint tensors: %s", ", ".join(unused[:8]))
    names = weights.kiln_to_hf({k: None for k in model.state_dict()}, config, task)
    hf_name = dict(zip(model.state_dict(), names)).get
    load_weights(model, state, lambda n: hf_name(n, n))
    model.task = task
    return model
