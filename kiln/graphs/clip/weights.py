"""Checkpoint key mapping for CLIP: one table, kiln name <-> Hugging Face name (CLIPModel's keys on disk).

``checkpoint.rename`` maps modules, i.e. keys ending in ``.weight`` / ``.bias``. CLIP also has bare parameters (the
class token, the temperature); they are a second, exact-name table, ``PARAMETERS``, renamed by ``rename_all`` here.
The per-layer and per-tower rows are functions of a prefix so that SigLIP (``graphs.siglip.weights``) reuses them.
"""

from __future__ import annotations

import re

from kiln.graphs.checkpoint import rename
from kiln.graphs.clip.config import CLIPConfig


def layer_rows(kiln: str, hf: str) -> list[tuple[str, str]]:
    """One pre-norm encoder layer (transformers' CLIPEncoderLayer, SigLIP's too)."""
    rows = [("attn_norm", "layer_norm1"), ("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"),
            ("attn.v", "self_attn.v_proj"), ("attn.o", "self_attn.out_proj"), ("mlp_norm", "layer_norm2"),
            ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]
    return [(f"{kiln}.layers.{{i}}.{k}", f"{hf}.encoder.layers.{{i}}.{h}") for k, h in rows]


def text_rows(kiln: str = "text_model", hf: str = "text_model") -> list[tuple[str, str]]:
    """The text tower's embeddings, layers and final norm (CLIPTextModel's, SigLIP's too)."""
    return [(f"{kiln}.embed", f"{hf}.embeddings.token_embedding"),
            (f"{kiln}.position", f"{hf}.embeddings.position_embedding"),
            *layer_rows(kiln, hf),
            (f"{kiln}.norm", f"{hf}.final_layer_norm")]


# kiln name -> Hugging Face name, for modules (each has .weight and maybe .bias).
TABLE = [
    *text_rows(),
    ("vision_model.patch", "vision_model.embeddings.patch_embedding"),
    ("vision_model.position", "vision_model.embeddings.position_embedding"),
    ("vision_model.pre_norm", "vision_model.pre_layrnorm"),  # sic: transformers' spelling
    *layer_rows("vision_model", "vision_model"),
    ("vision_model.post_norm", "vision_model.post_layernorm"),
    ("text_projection", "text_projection"),
    ("visual_projection", "visual_projection"),
]
# kiln name -> Hugging Face name, for bare parameters (matched exactly).
PARAMETERS = {
    "vision_model.cls": "vision_model.embeddings.class_embedding",
    "logit_scale": "logit_scale",
}
# Checkpoints from transformers < 4.31 saved the position_ids buffers; they are arange(T), which kiln computes.
IGNORED = re.compile(r"(^|\.)embeddings\.position_ids$")


def rename_all(state: dict, rules: list[tuple[str, str]], parameters: dict[str, str]) -> tuple[dict, list[str]]:
    """``checkpoint.rename`` for modules plus an exact-name lookup for bare parameters. Returns (renamed,
    unmatched keys). The renamed keys keep the input's order, one for one: ``checkpoint.attach_weights`` zips them
    with the model's names to name tensors in its errors."""
    modules, unmatched = rename({k: v for k, v in state.items() if k not in parameters}, rules)
    renamed, skip = iter(modules.items()), set(unmatched)
    out = {}
    for key, value in state.items():  # rename() kept the order of the keys it matched: interleave the bare ones
        if key in parameters:
            out[parameters[key]] = value
        elif key not in skip:
            name, value = next(renamed)
            out[name] = value
    return out, unmatched


def hf_to_kiln(hf_state: dict, config: CLIPConfig, task: str) -> tuple[dict, list[str]]:
    """Rename a Hugging Face state dict to kiln names. Returns (state, HF keys kiln does not use)."""
    inverse = {hf: kiln for kiln, hf in PARAMETERS.items()}
    state, unused = rename_all(hf_state, [(hf, kiln) for kiln, hf in TABLE], inverse)
    return state, [k for k in unused if not IGNORED.search(k)]


def kiln_to_hf(state: dict, config: CLIPConfig, task: str) -> dict:
    """The inverse: kiln names to the keys transformers writes for CLIPModel."""
    out, unmatched = rename_all(state, TABLE, PARAMETERS)
    if unmatched:
        raise KeyError(f"no Hugging Face name for kiln parameters {unmatched}")
    return out
