"""Compare the exported graph (run by the kiln runtime) with the framework's reference on several shapes.

The report, per output: max abs and max relative difference against the tolerance; per task: agreement (same labels,
same tokens, same answer spans, cosine of pooled embeddings). It is stored in kiln.json. The task metrics
(``TASK_CHECKS``) are also what a reduced precision is gated on (``kiln.exporter.precision``), with looser gates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kiln.exporter.specs import ExportSpec
from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine

MIN_COSINE = 0.9999


@dataclass(frozen=True)
class TaskCheck:
    """How a task's outputs are compared with the reference's: per-item values (1/0 agreement, or cosines), the
    name the validator reports them under with its aggregate (every row must pass a cosine: the minimum), and the
    name a reduced precision's accuracy reports their mean under."""

    values: Callable[[dict, dict, dict], np.ndarray]  # (reference outputs, engine outputs, feed) -> values
    name: str
    gate: float  # the validator's (fp32) gate
    accuracy_name: str
    worst: bool = False  # aggregate by the minimum (cosines) rather than the mean

    def aggregate(self, values: np.ndarray) -> float:
        return float(values.min()) if self.worst else float(values.mean())


def _same_argmax(name: str):
    """Agreement of the argmax over the last axis at valid positions (all rows for pooled outputs)."""

    def values(ref, got, feed):
        a, b = ref[name].argmax(-1), got[name].argmax(-1)
        mask = feed.get("attention_mask")
        # Valid positions of per-token outputs; a decoder's mask also covers the past, so take its last T columns.
        valid = mask[:, -a.shape[1]:].astype(bool) if mask is not None and a.ndim == 2 else np.ones(a.shape, bool)
        return (a == b)[valid]

    return values


def _same_span(ref, got, feed):
    """Question answering: the same best (start, end) token pair, start <= end, within the valid tokens."""

    def spans(out):
        mask = feed["attention_mask"].astype(bool)
        start = np.where(mask, out["start_logits"], -np.inf)
        end = np.where(mask, out["end_logits"], -np.inf)
        scores = start[:, :, None] + end[:, None, :]  # (B, T, T)
        scores = np.where(np.triu(np.ones(scores.shape[1:], bool)), scores, -np.inf)
        return scores.reshape(len(scores), -1).argmax(-1)

    return spans(ref) == spans(got)


def _cosines(name: str = "last_hidden_state"):
    """Cosine of the mean-pooled hidden states ``name`` (B, T, C), per row."""

    def values(ref, got, feed):
        mask = feed.get("attention_mask")  # images and audio have none: every position counts
        w = (mask if mask is not None else np.ones(ref[name].shape[:2]))[..., None].astype(np.float32)
        a = (ref[name] * w).sum(1) / w.sum(1)  # mean-pooled (B, C)
        b = (got[name] * w).sum(1) / w.sum(1)
        return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

    return values


def _row_cosines(name: str):
    """Cosine of the rows of ``name`` (B, C): pooled embeddings (a dual encoder's text_embeds, image_embeds)."""

    def values(ref, got, feed):
        a, b = ref[name], got[name]
        return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

    return values


TASK_CHECKS = {
    "feature-extraction": TaskCheck(_cosines(), "min_cosine", MIN_COSINE, "mean_cosine", worst=True),
    "text-classification": TaskCheck(_same_argmax("logits"), "label_agreement", 1.0, "label_agreement"),
    "image-classification": TaskCheck(_same_argmax("logits"), "label_agreement", 1.0, "label_agreement"),
    "token-classification": TaskCheck(_same_argmax("logits"), "token_agreement", 1.0, "token_agreement"),
    "fill-mask": TaskCheck(_same_argmax("logits"), "token_agreement", 1.0, "token_agreement"),
    "question-answering": TaskCheck(_same_span, "span_agreement", 1.0, "span_agreement"),
    # Teacher-forced: the same next token at every real position.
    "text-generation": TaskCheck(_same_argmax("logits"), "token_agreement", 1.0, "next_token_agreement"),
    "automatic-speech-recognition": TaskCheck(_same_argmax("logits"), "token_agreement", 1.0,
                                              "next_token_agreement"),
    # A graph that is not the one its task is judged by (an encoder-decoder's encoder): ExportSpec.extra["check"].
    "speech-encoder": TaskCheck(_cosines("encoder_last_hidden_state"), "min_cosine", MIN_COSINE, "mean_cosine",
                                worst=True),
    # An image + text dual encoder's two graphs, each judged by its projected embeddings.
    "text-embeddings": TaskCheck(_row_cosines("text_embeds"), "min_cosine", MIN_COSINE, "mean_cosine", worst=True),
    "image-embeddings": TaskCheck(_row_cosines("image_embeds"), "min_cosine", MIN_COSINE, "mean_cosine",
                                  worst=True),
}


def meaningful_positions(value: np.ndarray, feed: dict) -> np.ndarray:
    """A decoder's output at the positions a caller reads: logits of the step's tokens that are not padding, cache
    entries of positions that are not padding (which no later step attends). What a graph computes for a padded query
    is arbitrary: the reference lets a row with nothing to attend attend everything, onnxruntime's
    GroupQueryAttention (passes/cache_in_place.py) keeps it causal. Other outputs, and encoders', whole."""
    mask = feed.get("attention_mask")
    steps = np.shape(feed["input_ids"])[1] if "past_key_values.0.key" in feed else None
    if steps is None or mask is None or value.ndim < 3 or value.shape[0] != mask.shape[0]:
        return value
    keep = mask.astype(bool)
    if value.ndim == 3 and value.shape[1] == steps:  # logits (B, S, V)
        return value[keep[:, keep.shape[1] - steps:]]
    if value.ndim == 4 and value.shape[2] <= keep.shape[1]:  # a present (B, H, T, D); a window-bounded one: the last
        return value.transpose(0, 2, 1, 3)[keep[:, keep.shape[1] - value.shape[2]:]]
    return value


def validate(reference, spec: ExportSpec, onnx_path, seed: int = 0) -> dict:
    """``reference(feed) -> {output name: array}`` (``kiln.exporter.trace.<framework>.reference_runner``) against the
    graph."""
    engine = OnnxRuntimeEngine(onnx_path, device="cpu")
    rng = np.random.default_rng(seed)
    # Allowed difference per output: atol + rtol * (largest reference magnitude). fp32 error grows with depth and with
    # the size of the values (a 30-layer decoder's logits reach ~40), so a flat atol would reject sound graphs.
    stats = {o.name: {"max_abs": 0.0, "max_rel": 0.0, "max_ref": 0.0, "atol": spec.atol, "rtol": spec.rtol}
             for o in spec.outputs}
    check = TASK_CHECKS[spec.extra.get("check", spec.task)]
    values = []
    sizes = spec.validation_sizes()
    for size in sizes:
        feed = spec.make_feed(size, rng)
        ref = reference(feed)
        got = engine.run(feed)
        for name, entry in stats.items():
            r, g = ref[name], got[name]
            if r.shape != g.shape:
                raise AssertionError(f"output {name}: engine shape {g.shape} != reference {r.shape}")
            r, g = meaningful_positions(r, feed), meaningful_positions(g, feed)
            diff = float(np.abs(r - g).max()) if r.size else 0.0
            magnitude = float(np.abs(r).max()) if r.size else 0.0
            entry["max_abs"] = max(entry["max_abs"], diff)
            entry["max_rel"] = max(entry["max_rel"], diff / max(magnitude, 1e-12))
            entry["max_ref"] = max(entry["max_ref"], magnitude)
        values.append(np.asarray(check.values(ref, got, feed), dtype=np.float64).ravel())
    engine.close()
    value = check.aggregate(np.concatenate(values))
    report = {"shapes": [list(s.values()) for s in sizes], "outputs": stats,
              "task": {check.name: value, "gate": check.gate}}
    for entry in stats.values():
        entry["allowed"] = entry["atol"] + entry["rtol"] * entry["max_ref"]
    report["passed"] = bool(value >= check.gate and all(e["max_abs"] <= e["allowed"] for e in stats.values()))
    return report


def describe_failure(report: dict) -> str:
    lines = [f"{name}: max abs diff {e['max_abs']:.3g} (allowed {e['allowed']:.3g}), max rel {e['max_rel']:.3g}"
             for name, e in report["outputs"].items()]
    lines += [f"{k}: {v}" for k, v in report["task"].items()]
    return "; ".join(lines)
