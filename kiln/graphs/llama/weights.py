"""Checkpoint key mapping for the LLaMA family: one table, kiln name <-> Hugging Face name."""

from __future__ import annotations

import re

import numpy as np

from kiln.errors import CheckpointError
from kiln.graphs.checkpoint import rename
from kiln.graphs.llama.config import LlamaConfig

TABLE = [
    ("embed", "model.embed_tokens"),
    ("layers.{i}.attn_norm", "model.layers.{i}.input_layernorm"),
    ("layers.{i}.attn.q", "model.layers.{i}.self_attn.q_proj"),
    ("layers.{i}.attn.k", "model.layers.{i}.self_attn.k_proj"),
    ("layers.{i}.attn.v", "model.layers.{i}.self_attn.v_proj"),
    ("layers.{i}.attn.o", "model.layers.{i}.self_attn.o_proj"),
    ("layers.{i}.attn.q_norm", "model.layers.{i}.self_attn.q_norm"),  # Qwen3
    ("layers.{i}.attn.k_norm", "model.layers.{i}.self_attn.k_norm"),
    ("layers.{i}.mlp_norm", "model.layers.{i}.post_attention_layernorm"),
    ("layers.{i}.mlp.gate", "model.layers.{i}.mlp.gate_proj"),
    ("layers.{i}.mlp.up", "model.layers.{i}.mlp.up_proj"),
    ("layers.{i}.mlp.down", "model.layers.{i}.mlp.down_proj"),
    ("norm", "model.norm"),
    ("lm_head", "lm_head"),
]
# Rotary caches some converters store; kiln recomputes them.
IGNORED = re.compile(r"rotary_emb\.inv_freq$|\.masked_bias$")


# Phi-3 stores q, k and v as one matrix and gate and up as another: split on load, joined on save.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def _rows(config: LlamaConfig, layer: int, fused: str) -> list[int]:
    if fused == "mlp.gate_up_proj":
        return [config.intermediate_size] * 2
    kv = config.kv_heads_in_layer(layer) * config.head_dim
    return [config.heads_in_layer(layer) * config.head_dim, kv, kv]


def _cat(parts: list):
    """Row-wise join of NumPy arrays or torch tensors (whichever the state dict holds)."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch

    return torch.cat(parts)


def split_fused(hf_state: dict, config: LlamaConfig) -> dict:
    """Phi-3's fused tensors as the separate ones the key table names (rows in q, k, v / gate, up order)."""
    state = dict(hf_state)
    for i in range(config.num_hidden_layers):
        for fused, parts in FUSED.items():
            weight = state.pop(f"model.layers.{i}.{fused}.weight", None)
            if weight is None:
                continue  # attach_weights names what is missing
            rows = _rows(config, i, fused)
            if weight.shape[0] != sum(rows):
                raise CheckpointError(f"model.layers.{i}.{fused}.weight has {weight.shape[0]} rows; config.json's "
                                      f"sizes give {' + '.join(map(str, rows))} = {sum(rows)}.")
            start = 0
            for part, n in zip(parts, rows):
                state[f"model.layers.{i}.{part}.weight"] = weight[start:start + n]
                start += n
    return state


def join_fused(hf_state: dict, config: LlamaConfig) -> dict:
    state = dict(hf_state)
    for i in range(config.num_hidden_layers):
        for fused, parts in FUSED.items():
            names = [f"model.layers.{i}.{part}.weight" for part in parts]
            if all(name in state for name in names):
                state[f"model.layers.{i}.{fused}.weight"] = _cat([state.pop(name) for name in names])
    return state


def hf_to_kiln(hf_state: dict, config: LlamaConfig, task: str) -> tuple[dict, list[str]]:
    if config.variant.get("fused_projections"):
        hf_state = split_fused(hf_state, config)
    state, unused = rename(hf_state, [(hf, kiln) for kiln, hf in TABLE])
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding matrix is the head
    return state, [k for k in unused if not IGNORED.search(k)]


def kiln_to_hf(state: dict, config: LlamaConfig, task: str) -> dict:
    out, unmatched = rename(state, TABLE)
    if unmatched:
        raise KeyError(f"no Hugging Face name for kiln parameters {unmatched}")
    # A state of None placeholders asks for names one to one (what the loader's messages say): left separate.
    if config.variant.get("fused_projections") and any(v is not None for v in out.values()):
        return join_fused(out, config)
    return out
