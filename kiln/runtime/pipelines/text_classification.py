"""text-classification: labels and scores as transformers.pipeline("text-classification") returns them."""

from __future__ import annotations

import numpy as np

from kiln.errors import InputError
from kiln.runtime.pipelines.base import Pipeline, check_int, given
from kiln.runtime.scores import apply_function, check_function

_NOT_GIVEN = object()  # top_k not given: transformers' historical one-dict-per-input output (None means all labels)


class TextClassificationPipeline(Pipeline):
    """Inputs: a string, a ``{"text", "text_pair"}`` dict, or a list of either. ``top_k=None`` returns every label
    sorted by score; the default returns the best label only, shaped as transformers does."""

    task = "text-classification"

    def setup(self) -> None:
        self.id2label = {int(k): v for k, v in (self.config.get("id2label") or {}).items()}
        self.problem_type = self.config.get("problem_type")

    def _sanitize_parameters(self, truncation=None, top_k=_NOT_GIVEN, function_to_apply=None):
        post = {}
        if top_k is not _NOT_GIVEN:
            if top_k is not None:
                check_int("top_k", top_k, what="a positive integer or None")
            post.update(top_k=top_k, legacy=False)  # as transformers: given anywhere, a list of labels comes back
        if function_to_apply is not None:
            post["function_to_apply"] = check_function(function_to_apply)
        return given(truncation=truncation), {}, post

    def _items(self, inputs):
        if isinstance(inputs, dict):
            return True, [inputs]
        return super()._items(inputs)

    def preprocess(self, items, truncation: bool = True):
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

    def postprocess(self, model_inputs, outputs, top_k=1, legacy: bool = True, function_to_apply=None):
        logits = outputs["logits"].astype(np.float32)  # (B, num_labels)
        scores = apply_function(logits, function_to_apply, self.problem_type)
        results = []
        for row in scores:
            if legacy:
                best = int(row.argmax())
                results.append({"label": self.id2label.get(best, f"LABEL_{best}"), "score": float(row[best])})
                continue
            ranked = sorted(({"label": self.id2label.get(i, f"LABEL_{i}"), "score": float(s)} for i, s in enumerate(row)),
                            key=lambda d: d["score"], reverse=True)
            results.append(ranked if top_k is None else ranked[:top_k])
        return results

    def _shape(self, inputs, single, results, **kwargs):
        # transformers: a single *string* comes back as a one-item list unless this call gives top_k (even when the
        # pipeline was made with one: then a list of one list of labels), a dict pair does not.
        if single:
            return [results[0]] if "top_k" not in kwargs and isinstance(inputs, str) else results[0]
        return results
