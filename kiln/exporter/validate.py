"""Compare the exported graph (run by the kiln runtime) with the framework's reference on several shapes.

The report, per output: max abs and max relative difference against the tolerance; per task: agreement (same labels,
same tokens, same answer spans, cosine of pooled embeddings). It is stored in kiln.json.
"""

from __future__ import annotations

import numpy as np

from kiln.exporter.specs import ExportSpec
from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine

MIN_COSINE = 0.9999


def _same_argmax(name: str):
    """Agreement of the argmax over the last axis at valid positions (all rows for pooled outputs)."""

    def check(ref, got, feed):
        a, b = ref[name].argmax(-1), got[name].argmax(-1)
        mask = feed.get("attention_mask")
        # Valid positions of per-token outputs; a decoder's mask also covers the past, so take its last T columns.
        valid = mask[:, -a.shape[1]:].astype(bool) if mask is not None and a.ndim == 2 else np.ones(a.shape, bool)
        return "label_agreement" if a.ndim == 1 else "token_agreement", (a == b)[valid], 1.0

    return check


def _same_span(ref, got, feed):
    """Question answering: the same best (start, end) token pair, start <= end, within the valid tokens."""

    def spans(out):
        mask = feed["attention_mask"].astype(bool)
        start = np.where(mask, out["start_logits"], -np.inf)
        end = np.where(mask, out["end_logits"], -np.inf)
        scores = start[:, :, None] + end[:, None, :]  # (B, T, T)
        scores = np.where(np.triu(np.ones(scores.shape[1:], bool)), scores, -np.inf)
        return scores.reshape(len(scores), -1).argmax(-1)

    return "span_agreement", spans(ref) == spans(got), 1.0


def _cosine(ref, got, feed):
    mask = feed.get("attention_mask")  # images have none: every token counts
    w = (mask if mask is not None else np.ones(ref["last_hidden_state"].shape[:2]))[..., None].astype(np.float32)
    a = (ref["last_hidden_state"] * w).sum(1) / w.sum(1)  # mean-pooled (B, C)
    b = (got["last_hidden_state"] * w).sum(1) / w.sum(1)
    return "min_cosine", (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)), MIN_COSINE


TASK_CHECKS = {
    "feature-extraction": _cosine,
    "text-classification": _same_argmax("logits"),
    "image-classification": _same_argmax("logits"),
    "token-classification": _same_argmax("logits"),
    "fill-mask": _same_argmax("logits"),
    "question-answering": _same_span,
    "text-generation": _same_argmax("logits"),
}


def validate(reference, spec: ExportSpec, onnx_path, seed: int = 0) -> dict:
    """``reference(feed) -> {output name: array}`` (``trace_{torch,jax,tf}.reference_runner``) against the graph."""
    engine = OnnxRuntimeEngine(onnx_path, device="cpu")
    rng = np.random.default_rng(seed)
    # Allowed difference per output: atol + rtol * (largest reference magnitude). fp32 error grows with depth and with
    # the size of the values (a 30-layer decoder's logits reach ~40), so a flat atol would reject sound graphs.
    stats = {o.name: {"max_abs": 0.0, "max_rel": 0.0, "max_ref": 0.0, "atol": spec.atol, "rtol": spec.rtol}
             for o in spec.outputs}
    check = TASK_CHECKS[spec.task]
    values, metric, gate = [], None, None
    sizes = spec.validation_sizes()
    for size in sizes:
        feed = spec.make_feed(size, rng)
        ref = reference(feed)
        got = engine.run(feed)
        for name, entry in stats.items():
            r, g = ref[name], got[name]
            if r.shape != g.shape:
                raise AssertionError(f"output {name}: engine shape {g.shape} != reference {r.shape}")
            diff = float(np.abs(r - g).max()) if r.size else 0.0
            magnitude = float(np.abs(r).max()) if r.size else 0.0
            entry["max_abs"] = max(entry["max_abs"], diff)
            entry["max_rel"] = max(entry["max_rel"], diff / max(magnitude, 1e-12))
            entry["max_ref"] = max(entry["max_ref"], magnitude)
        metric, agreement, gate = check(ref, got, feed)
        values.append(np.asarray(agreement, dtype=np.float64).ravel())
    engine.close()
    values = np.concatenate(values)
    value = float(values.min()) if metric == "min_cosine" else float(values.mean())
    report = {"shapes": [list(s.values()) for s in sizes], "outputs": stats, "task": {metric: value, "gate": gate}}
    for entry in stats.values():
        entry["allowed"] = entry["atol"] + entry["rtol"] * entry["max_ref"]
    report["passed"] = bool(value >= gate and all(e["max_abs"] <= e["allowed"] for e in stats.values()))
    return report


def describe_failure(report: dict) -> str:
    lines = [f"{name}: max abs diff {e['max_abs']:.3g} (allowed {e['allowed']:.3g}), max rel {e['max_rel']:.3g}"
             for name, e in report["outputs"].items()]
    lines += [f"{k}: {v}" for k, v in report["task"].items()]
    return "; ".join(lines)
