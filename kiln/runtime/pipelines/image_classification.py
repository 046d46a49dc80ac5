"""image-classification: labels and scores as transformers.pipeline("image-classification") returns them."""

from __future__ import annotations

import numpy as np

from kiln.errors import ArtifactError
from kiln.runtime.pipelines.base import Pipeline, check_int, given
from kiln.runtime.pipelines.images import ImageInputs, pixel_shape
from kiln.runtime.scores import apply_function, check_function

DEFAULT_TOP_K = 5


class ImageClassificationPipeline(ImageInputs, Pipeline):
    """Inputs: a file path (str or pathlib.Path), a PIL image, a numpy array, or a list of those (see
    ``kiln.runtime.image_processor`` for what each may hold). Returns per image the ``top_k`` best labels
    ``[{"label", "score"}, ...]``, best first; a list of such lists for a list input.

    As in transformers: ``top_k`` defaults to 5, ``top_k=None`` also means 5, and a ``top_k`` above the number of
    labels returns every label. ``function_to_apply`` ("softmax", "sigmoid", "none") defaults by ``problem_type``
    and the number of labels. Unlike transformers, ``top_k`` must be a positive integer (transformers returns [] for 0).
    """

    task = "image-classification"

    def setup(self) -> None:
        self.id2label = {int(k): v for k, v in (self.config.get("id2label") or {}).items()}
        self.problem_type = self.config.get("problem_type")

    def load_preprocessor(self) -> None:
        shape = pixel_shape(self.engine.inputs())
        if shape is None:
            raise ArtifactError(f"{self.path} has no 'pixel_values' input; it is not an image model. Re-export it.")
        self.load_images(shape)

    def _sanitize_parameters(self, top_k=None, function_to_apply=None):
        # top_k=None means the default (5), as in transformers
        if top_k is not None:
            check_int("top_k", top_k, what="a positive integer")
        if function_to_apply is not None:
            function_to_apply = check_function(function_to_apply)
        return {}, {}, given(top_k=top_k, function_to_apply=function_to_apply)

    def preprocess(self, items):
        return self.images(items)

    def postprocess(self, model_inputs, outputs, top_k=DEFAULT_TOP_K, function_to_apply=None):
        logits = outputs["logits"].astype(np.float32)  # (B, num_labels)
        scores = apply_function(logits, function_to_apply, self.problem_type)
        k = min(top_k, logits.shape[-1])
        results = []
        for row in scores:
            labelled = ({"label": self.id2label.get(i, f"LABEL_{i}"), "score": float(s)} for i, s in enumerate(row))
            ranked = sorted(labelled, key=lambda d: d["score"], reverse=True)  # stable: ties keep label order
            results.append(ranked[:k])
        return results

