"""Compare the exported graph (run by the kiln runtime) with the PyTorch reference on several shapes.

The report, per output: max abs and max relative difference against the tolerance; per task: agreement (same labels
for classifiers, cosine of pooled embeddings for feature extraction). It is stored in kiln.json.
"""

from __future__ import annotations

import numpy as np
import torch

from kiln.exporter.specs import ExportSpec
from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine

MIN_COSINE = 0.9999


def validation_shapes(spec: ExportSpec) -> list[tuple[int, int]]:
    """A few (batch, sequence) pairs inside the exported ranges: a single row, odd lengths, padded batches."""
    b, t = spec.axes["batch"], spec.axes["sequence"]
    wanted = [(1, 7), (2, 16), (3, 33), (1, 1)]
    clamp = lambda v, r: min(max(v, r.min), r.max)  # noqa: E731
    return list(dict.fromkeys((clamp(x, b), clamp(y, t)) for x, y in wanted))


def validate(model: torch.nn.Module, spec: ExportSpec, onnx_path, seed: int = 0) -> dict:
    engine = OnnxRuntimeEngine(onnx_path, device="cpu")
    rng = np.random.default_rng(seed)
    stats = {o.name: {"max_abs": 0.0, "max_rel": 0.0, "atol": spec.atol} for o in spec.outputs}
    agreement = []
    shapes = validation_shapes(spec)
    for batch, seq in shapes:
        feed = spec.dummy_inputs(batch, seq, rng)
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
        got = engine.run(feed)
        for name, entry in stats.items():
            r, g = ref[name].numpy(), got[name]
            if r.shape != g.shape:
                raise AssertionError(f"output {name}: engine shape {g.shape} != reference {r.shape}")
            diff = float(np.abs(r - g).max()) if r.size else 0.0
            entry["max_abs"] = max(entry["max_abs"], diff)
            entry["max_rel"] = max(entry["max_rel"], diff / max(float(np.abs(r).max()), 1e-12))
        agreement.append(_task_agreement(spec.task, ref, got, feed["attention_mask"]))
    report = {"shapes": [list(s) for s in shapes], "outputs": stats}
    if spec.task == "text-classification":
        report["task"] = {"label_agreement": float(np.mean(np.concatenate(agreement)))}
        task_ok = report["task"]["label_agreement"] == 1.0
    else:
        report["task"] = {"min_cosine": float(min(a.min() for a in agreement)), "gate": MIN_COSINE}
        task_ok = report["task"]["min_cosine"] >= MIN_COSINE
    report["passed"] = bool(task_ok and all(e["max_abs"] <= e["atol"] for e in stats.values()))
    engine.close()
    return report


def _task_agreement(task: str, ref: dict, got: dict, mask: np.ndarray) -> np.ndarray:
    if task == "text-classification":
        return (ref["logits"].numpy().argmax(-1) == got["logits"].argmax(-1)).astype(np.float64)
    w = mask[..., None].astype(np.float32)
    a = (ref["last_hidden_state"].numpy() * w).sum(1) / w.sum(1)  # mean-pooled (B, C)
    b = (got["last_hidden_state"] * w).sum(1) / w.sum(1)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def describe_failure(report: dict) -> str:
    lines = [f"{name}: max abs diff {e['max_abs']:.3g} (allowed {e['atol']:.3g}), max rel {e['max_rel']:.3g}"
             for name, e in report["outputs"].items()]
    lines += [f"{k}: {v}" for k, v in report["task"].items()]
    return "; ".join(lines)
