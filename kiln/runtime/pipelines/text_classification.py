"""text-classification: labels and scores as transformers.pipeline("text-classification") returns them."""

from __future__ import annotations

import numpy as np

from kiln.errors import InputError
from kiln.runtime.pipelines.base import Pipeline

FUNCTIONS = ("softmax", "sigmoid", "none")
_LEGACY = object()  # top_k not given: transformers' historical one-dict-per-input output


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class TextClassificationPipeline(Pipeline):
    """Inputs: a string, a ``{"text", "text_pair"}`` dict, or a list of either. ``top_k=None`` returns every label
    sorted by score; the default returns the best label only, shaped as transformers does."""

    task = "text-classification"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.id2label = {int(k): v for k, v in (self.config.get("id2label") or {}).items()}
        self.problem_type = self.config.get("problem_type")

    def _items(self, inputs):
        if isinstance(inputs, dict):
            return True, [inputs]
        return super()._items(inputs)

    def default_function(self, num_labels: int) -> str:
        if self.problem_type == "regression":
            return "none"
        if self.problem_type == "multi_label_classification" or num_labels == 1:
            return "sigmoid"
        return "softmax"

    def preprocess(self, items, truncation: bool = True, **kwargs):
        texts, pairs = [], []
        for item in items:
            if isinstance(item, dict):
                if "text" not in item:
                    raise InputError('A text pair is a dict {"text": ..., "text_pair": ...}; "text" is missing.')
                texts.append(item["text"])
                pairs.append(item.get("text_pair"))
            else:
                texts.append(item)
                pairs.append(None)
        return self.tokenizer(texts, pairs if any(p is not None for p in pairs) else None, truncation=truncation)

    def postprocess(self, model_inputs, outputs, top_k=_LEGACY, function_to_apply=None, **kwargs):
        logits = outputs["logits"].astype(np.float32)  # (B, num_labels)
        function = (function_to_apply or self.default_function(logits.shape[-1])).lower()
        if function not in FUNCTIONS:
            raise InputError(f"function_to_apply must be one of {FUNCTIONS}, got {function_to_apply!r}.")
        if top_k is not _LEGACY and top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise InputError(f"top_k must be a positive integer or None, got {top_k!r}.")
        scores = {"softmax": softmax, "sigmoid": sigmoid, "none": lambda x: x}[function](logits)
        results = []
        for row in scores:
            if top_k is _LEGACY:
                best = int(row.argmax())
                results.append({"label": self.id2label.get(best, f"LABEL_{best}"), "score": float(row[best])})
                continue
            ranked = sorted(({"label": self.id2label.get(i, f"LABEL_{i}"), "score": float(s)} for i, s in enumerate(row)),
                            key=lambda d: d["score"], reverse=True)
            results.append(ranked if top_k is None else ranked[:top_k])
        return results

    def _shape(self, inputs, single, results, top_k=_LEGACY, **kwargs):
        # transformers: a single *string* without top_k still comes back as a one-item list (a dict pair does not).
        if single:
            return [results[0]] if top_k is _LEGACY and isinstance(inputs, str) else results[0]
        return results
