"""Checkpoint key mapping for SigLIP: one table, kiln name <-> Hugging Face name (SiglipModel's keys on disk).

The towers share CLIP's rows (``graphs.clip.weights``). Keys not of the ``module.weight`` / ``module.bias`` form
go in ``PARAMETERS``, matched exactly: the probe, the temperature and bias, and the pooling head's
``nn.MultiheadAttention`` input projection, whose fused ``in_proj_weight`` / ``in_proj_bias`` kiln keeps fused as
one Linear (``head.in_proj``) and slices into q/k/v in the forward.
"""

from __future__ import annotations

from kiln.graphs.clip.weights import IGNORED, layer_rows, rename_all, text_rows
from kiln.graphs.siglip.config import SiglipConfig

HEAD = "vision_model.head"
# kiln name -> Hugging Face name, for modules (each has .weight and maybe .bias).
TABLE = [
    *text_rows(),
    ("text_model.head", "text_model.head"),
    ("vision_model.patch", "vision_model.embeddings.patch_embedding"),
    ("vision_model.position", "vision_model.embeddings.position_embedding"),
    *layer_rows("vision_model", "vision_model"),
    ("vision_model.post_norm", "vision_model.post_layernorm"),
    (f"{HEAD}.o", f"{HEAD}.attention.out_proj"),
    (f"{HEAD}.norm", f"{HEAD}.layernorm"),
    (f"{HEAD}.mlp.fc1", f"{HEAD}.mlp.fc1"),
    (f"{HEAD}.mlp.fc2", f"{HEAD}.mlp.fc2"),
]
# kiln name -> Hugging Face name, matched exactly.
PARAMETERS = {
    f"{HEAD}.probe": f"{HEAD}.probe",
    f"{HEAD}.in_proj.weight": f"{HEAD}.attention.in_proj_weight",
    f"{HEAD}.in_proj.bias": f"{HEAD}.attention.in_proj_bias",
    "logit_scale": "logit_scale",
    "logit_bias": "logit_bias",
}


def hf_to_kiln(hf_state: dict, config: SiglipConfig, task: str) -> tuple[dict, list[str]]:
    """Rename a Hugging Face state dict to kiln names. Returns (state, HF keys kiln does not use)."""
    inverse = {hf: kiln for kiln, hf in PARAMETERS.items()}
    state, unused = rename_all(hf_state, [(hf, kiln) for kiln, hf in TABLE], inverse)
    return state, [k for k in unused if not IGNORED.search(k)]


def kiln_to_hf(state: dict, config: SiglipConfig, task: str) -> dict:
    """The inverse: kiln names to the keys transformers writes for SiglipModel."""
    out, unmatched = rename_all(state, TABLE, PARAMETERS)
    if unmatched:
        raise KeyError(f"no Hugging Face name for kiln parameters {unmatched}")
    return out
