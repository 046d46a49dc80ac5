"""Checkpoint key mapping for DINOv2: one table, kiln name <-> Hugging Face name.

The Hugging Face names are the ones on disk (``encoder.layer.{i}.attention.attention.query``, SwiGLU's fused
``mlp.weights_in``): transformers 5 renames and splits them in memory but writes them back so when it saves, and every
hub checkpoint uses them.
"""

from __future__ import annotations

import re

from kiln.graphs.dinov2.config import Dinov2Config
from kiln.graphs.vit.weights import _rename

# kiln name -> Hugging Face name (relative to the base model). A module gets .weight and .bias; a bare parameter
# (the CLS token, the position embeddings, the layer scales) is matched as is.
TABLE = [
    ("embeddings.cls", "embeddings.cls_token"),
    ("embeddings.position", "embeddings.position_embeddings"),
    ("embeddings.patch", "embeddings.patch_embeddings.projection"),
    ("layers.{i}.attn_norm", "encoder.layer.{i}.norm1"),
    ("layers.{i}.attn.q", "encoder.layer.{i}.attention.attention.query"),
    ("layers.{i}.attn.k", "encoder.layer.{i}.attention.attention.key"),
    ("layers.{i}.attn.v", "encoder.layer.{i}.attention.attention.value"),
    ("layers.{i}.attn.o", "encoder.layer.{i}.attention.output.dense"),
    ("layers.{i}.attn_scale", "encoder.layer.{i}.layer_scale1.lambda1"),
    ("layers.{i}.mlp_norm", "encoder.layer.{i}.norm2"),
    ("layers.{i}.mlp_scale", "encoder.layer.{i}.layer_scale2.lambda1"),
    ("norm", "layernorm"),
]
MLP = {  # by use_swiglu_ffn
    False: [("layers.{i}.mlp.up", "encoder.layer.{i}.mlp.fc1"), ("layers.{i}.mlp.down", "encoder.layer.{i}.mlp.fc2")],
    True: [("layers.{i}.mlp.gate_up", "encoder.layer.{i}.mlp.weights_in"),
           ("layers.{i}.mlp.down", "encoder.layer.{i}.mlp.weights_out")],
}
# Task checkpoints nest the base model under "dinov2." and put the head beside it.
BASE_PREFIX = "dinov2."
HEADS = {"image-classification": [("classifier", "classifier")]}
# Tensors a checkpoint may carry that kiln does not use: the masked-image-modeling token (pretraining only), a
# classifier the chosen task has no place for.
IGNORED = re.compile(r"(^|\.)mask_token$|^classifier\.")


def _rules(task: str, config: Dinov2Config) -> list[tuple[str, str]]:
    """(kiln name, HF name) pairs for this task, full names from the top of each model."""
    table = TABLE + MLP[config.use_swiglu_ffn]
    if task == "feature-extraction":  # Dinov2Model: no nesting on either side
        return table
    return [("dinov2." + k, BASE_PREFIX + h) for k, h in table] + HEADS[task]


# Copied from graphs.vit.weights.hf_to_kiln, with this family's rules
def hf_to_kiln(hf_state: dict, config: Dinov2Config, task: str) -> tuple[dict, list[str]]:
    """Rename a Hugging Face state dict to kiln names. Returns (state, HF keys kiln does not use)."""
    rules = _rules(task, config)
    nested = any(k.startswith(BASE_PREFIX) for k in hf_state)
    if task != "feature-extraction" and not nested:
        # A base-model checkpoint (Dinov2Model) under a task head: transformers accepts it too (the head is missing).
        rules = [(k, h.removeprefix(BASE_PREFIX)) for k, h in rules]
    elif task == "feature-extraction" and nested:
        # A task checkpoint used for its encoder only.
        rules = [(k, BASE_PREFIX + h) for k, h in rules]
    state, unused = _rename(hf_state, [(h, k) for k, h in rules])
    return state, [k for k in unused if not IGNORED.search(k)]


def kiln_to_hf(state: dict, config: Dinov2Config, task: str) -> dict:
    """The inverse: kiln names to the keys transformers writes for the same model class."""
    out, unmatched = _rename(state, _rules(task, config))
    if unmatched:
        raise KeyError(f"no Hugging Face name for kiln parameters {unmatched}")
    return out
