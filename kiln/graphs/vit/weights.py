"""Checkpoint key mapping for ViT: one table, kiln name <-> Hugging Face name.

The Hugging Face names are the ones on disk (``encoder.layer.{i}.attention.attention.query``): transformers 5 renames
them to ``layers.{i}.attention.q_proj`` in memory but converts back when it saves, and every hub checkpoint uses them.
"""

from __future__ import annotations

import re

from kiln.graphs.vit.config import ViTConfig

# kiln name -> Hugging Face name (relative to the base model). A module gets .weight and .bias; a bare parameter
# (the CLS token, the position embeddings) is matched as is.
TABLE = [
    ("embeddings.cls", "embeddings.cls_token"),
    ("embeddings.position", "embeddings.position_embeddings"),
    ("embeddings.patch", "embeddings.patch_embeddings.projection"),
    ("layers.{i}.attn_norm", "encoder.layer.{i}.layernorm_before"),
    ("layers.{i}.attn.q", "encoder.layer.{i}.attention.attention.query"),
    ("layers.{i}.attn.k", "encoder.layer.{i}.attention.attention.key"),
    ("layers.{i}.attn.v", "encoder.layer.{i}.attention.attention.value"),
    ("layers.{i}.attn.o", "encoder.layer.{i}.attention.output.dense"),
    ("layers.{i}.mlp_norm", "encoder.layer.{i}.layernorm_after"),
    ("layers.{i}.mlp.up", "encoder.layer.{i}.intermediate.dense"),
    ("layers.{i}.mlp.down", "encoder.layer.{i}.output.dense"),
    ("norm", "layernorm"),
    ("pooler", "pooler.dense"),
]
# Task checkpoints nest the base model under "vit." and put the head beside it.
BASE_PREFIX = "vit."
HEADS = {"image-classification": [("classifier", "classifier")]}
# Tensors a checkpoint may carry that kiln does not use: the masked-image-modeling token and decoder, a pooler or
# classifier the chosen task has no place for.
IGNORED = re.compile(r"(^|\.)mask_token$|^decoder\.|^(vit\.)?pooler\.|^classifier\.")


def _rules(task: str) -> list[tuple[str, str]]:
    """(kiln name, HF name) pairs for this task, full names from the top of each model."""
    if task == "feature-extraction":  # ViTModel: no nesting on either side
        return list(TABLE)
    return [("vit." + k, BASE_PREFIX + h) for k, h in TABLE if k != "pooler"] + HEADS[task]


def _rename(state: dict, rules: list[tuple[str, str]]) -> tuple[dict, list[str]]:
    """Rename keys by (from, to) rules, where '{i}' stands for a layer index; a rule matches the name itself or the
    name + .weight/.bias. Returns (renamed, unmatched)."""
    compiled = [(re.compile("^" + re.escape(a).replace(r"\{i\}", r"(\d+)") + r"(\.weight|\.bias)?$"), b)
                for a, b in rules]
    out, unmatched = {}, []
    for key, value in state.items():
        for pattern, target in compiled:
            m = pattern.match(key)
            if m:
                *index, suffix = m.groups()
                name = target.replace("{i}", index[0]) if index else target
                out[name + (suffix or "")] = value
                break
        else:
            unmatched.append(key)
    return out, unmatched


def hf_to_kiln(hf_state: dict, config: ViTConfig, task: str) -> tuple[dict, list[str]]:
    """Rename a Hugging Face state dict to kiln names. Returns (state, HF keys kiln does not use)."""
    rules = _rules(task)
    nested = any(k.startswith(BASE_PREFIX) for k in hf_state)
    if task != "feature-extraction" and not nested:
        # A base-model checkpoint (ViTModel) under a task head: transformers accepts it too (the head is then missing).
        rules = [(k, h.removeprefix(BASE_PREFIX)) for k, h in rules]
    elif task == "feature-extraction" and nested:
        # A task checkpoint used for its encoder only.
        rules = [(k, BASE_PREFIX + h) for k, h in rules]
    state, unused = _rename(hf_state, [(h, k) for k, h in rules])
    return state, [k for k in unused if not IGNORED.search(k)]


def kiln_to_hf(state: dict, config: ViTConfig, task: str) -> dict:
    """The inverse: kiln names to the keys transformers writes for the same model class."""
    out, unmatched = _rename(state, _rules(task))
    if unmatched:
        raise KeyError(f"no Hugging Face name for kiln parameters {unmatched}")
    return out
