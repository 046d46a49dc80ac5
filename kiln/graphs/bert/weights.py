"""Checkpoint key mapping for the BERT family: one table, kiln name <-> Hugging Face name."""

from __future__ import annotations

import re

from kiln.graphs.bert.config import BertConfig

# kiln parameter prefix -> Hugging Face prefix (relative to the base model); each gets .weight and .bias.
TABLE = [
    ("embeddings.word", "embeddings.word_embeddings"),
    ("embeddings.position", "embeddings.position_embeddings"),
    ("embeddings.token_type", "embeddings.token_type_embeddings"),
    ("embeddings.norm", "embeddings.LayerNorm"),
    ("layers.{i}.attn.q", "encoder.layer.{i}.attention.self.query"),
    ("layers.{i}.attn.k", "encoder.layer.{i}.attention.self.key"),
    ("layers.{i}.attn.v", "encoder.layer.{i}.attention.self.value"),
    ("layers.{i}.attn.o", "encoder.layer.{i}.attention.output.dense"),
    ("layers.{i}.attn_norm", "encoder.layer.{i}.attention.output.LayerNorm"),
    ("layers.{i}.mlp.up", "encoder.layer.{i}.intermediate.dense"),
    ("layers.{i}.mlp.down", "encoder.layer.{i}.output.dense"),
    ("layers.{i}.mlp_norm", "encoder.layer.{i}.output.LayerNorm"),
    ("pooler", "pooler.dense"),
]
# Task heads sit beside the base model, which task checkpoints nest under a prefix ("bert.", "roberta.").
HEADS = {
    ("bert", "text-classification"): [("classifier", "classifier")],
    ("roberta", "text-classification"): [("classifier.dense", "classifier.dense"), ("classifier.out", "classifier.out_proj")],
}
BASE_PREFIX = {"bert": "bert.", "roberta": "roberta."}
ARCHITECTURE_NAMES = {
    ("bert", "feature-extraction"): "BertModel",
    ("bert", "text-classification"): "BertForSequenceClassification",
    ("roberta", "feature-extraction"): "RobertaModel",
    ("roberta", "text-classification"): "RobertaForSequenceClassification",
}
# Buffers and heads of other tasks that a checkpoint may carry and kiln does not use.
IGNORED = re.compile(r"(^|\.)(position_ids|token_type_ids)$|^(cls|lm_head|qa_outputs|classifier)\.")
# Checkpoints converted from the original TensorFlow BERT name LayerNorm parameters gamma/beta.
LEGACY = {".gamma": ".weight", ".beta": ".bias"}


def _rules(config: BertConfig, task: str) -> list[tuple[str, str]]:
    """(kiln prefix, HF prefix) pairs for this model and task, full names from the top of each model."""
    if task == "feature-extraction":  # BertModel/RobertaModel: no nesting on either side
        return list(TABLE)
    base = BASE_PREFIX[config.model_type]
    return [("bert." + k, base + h) for k, h in TABLE] + HEADS[(config.model_type, task)]


def _rename(state: dict, rules: list[tuple[str, str]]) -> tuple[dict, list[str]]:
    """Rename keys by (from, to) prefix rules, where '{i}' stands for a layer index. Returns (renamed, unmatched)."""
    compiled = [(re.compile("^" + re.escape(a).replace(r"\{i\}", r"(\d+)") + r"\.(weight|bias)$"), b) for a, b in rules]
    out, unmatched = {}, []
    for key, value in state.items():
        for pattern, target in compiled:
            m = pattern.match(key)
            if m:
                *index, kind = m.groups()
                name = target.replace("{i}", index[0]) if index else target
                out[f"{name}.{kind}"] = value
                break
        else:
            unmatched.append(key)
    return out, unmatched


def hf_to_kiln(hf_state: dict, config: BertConfig, task: str) -> tuple[dict, list[str]]:
    """Rename a Hugging Face state dict to kiln names. Returns (state, HF keys kiln does not use)."""
    fixed = {}
    for key, value in hf_state.items():
        for old, new in LEGACY.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        fixed[key] = value
    rules = _rules(config, task)
    if task != "feature-extraction" and not any(k.startswith(BASE_PREFIX[config.model_type]) for k in fixed):
        # A base-model checkpoint (no "bert." nesting) loaded under a task head: transformers accepts it too.
        rules = [(k, h.removeprefix(BASE_PREFIX[config.model_type])) for k, h in rules]
    elif task == "feature-extraction" and any(k.startswith(BASE_PREFIX[config.model_type]) for k in fixed):
        # A task checkpoint used for its encoder only.
        rules = [(k, BASE_PREFIX[config.model_type] + h) for k, h in rules]
    state, unused = _rename(fixed, [(h, k) for k, h in rules])
    return state, [k for k in unused if not IGNORED.search(k)]


def kiln_to_hf(state: dict, config: BertConfig, task: str) -> dict:
    """The inverse: kiln names to the keys transformers writes for the same model class."""
    out, unmatched = _rename(state, _rules(config, task))
    if unmatched:
        raise KeyError(f"no Hugging Face name for kiln parameters {unmatched}")
    return out
