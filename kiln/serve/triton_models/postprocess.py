"""Triton Python-backend model written by ``kiln triton``: the model's outputs in, the task's answer out.

Runs as ``<name>_postprocess/1/model.py`` with ``postprocess.json`` beside it (the task, and for a classifier its
labels and score function, read from the artifact's config.json by kiln). Needs numpy only, not kiln.

- feature-extraction: ``last_hidden_state`` (B, T, C) and ``attention_mask`` (B, T) -> ``EMBEDDING`` (B, C), the
  mean over the real tokens scaled to unit length, as ``kiln.pipeline("feature-extraction", OUT, pooling="mean",
  normalize=True)`` gives it.
- text-classification: ``logits`` (B, L) -> ``SCORES`` (B, L) in label-id order and ``LABELS`` (B, 1), per row a
  JSON list of ``{"label", "score"}`` sorted by score, as ``kiln.pipeline("text-classification", OUT, top_k=None)``.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


# Copied from kiln.runtime.scores.softmax
def softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis, shifted by its maximum so that exp cannot overflow; keeps the input's float dtype."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# Copied from kiln.runtime.scores.sigmoid
def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


FUNCTIONS = {"softmax": softmax, "sigmoid": sigmoid, "none": lambda x: x}


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B, T, C), (B, T) -> (B, C) unit vectors. Copied from
    kiln.runtime.pipelines.feature_extraction.FeatureExtractionPipeline.postprocess (pooling="mean", normalize)."""
    weights = mask[..., None].astype(hidden.dtype)  # (B, T, 1)
    pooled = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)  # (B, C)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


class TritonPythonModel:
    def initialize(self, args):
        directory = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(directory, "postprocess.json"), encoding="utf-8") as f:
            settings = json.load(f)
        self.task = settings["task"]
        self.labels = settings.get("labels", [])
        self.function = FUNCTIONS[settings.get("function", "softmax")]
        config = json.loads(args["model_config"])
        self.outputs = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}

    def execute(self, requests):
        responses = []
        for request in requests:
            def read(name):
                return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

            if self.task == "feature-extraction":
                hidden = read("last_hidden_state").astype(np.float32)  # (B, T, C)
                outputs = {"EMBEDDING": mean_pool(hidden, read("attention_mask"))}
            else:
                scores = self.function(read("logits").astype(np.float32))  # (B, L)
                outputs = {"SCORES": scores, "LABELS": np.array([[self.ranked(row)] for row in scores], dtype=object)}
            tensors = [pb_utils.Tensor(name, outputs[name].astype(dtype)) for name, dtype in self.outputs.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def ranked(self, row) -> bytes:
        """One row's labels and scores, best first, as UTF-8 JSON."""
        named = [{"label": self.labels[i] if i < len(self.labels) else f"LABEL_{i}", "score": float(s)}
                 for i, s in enumerate(row)]
        return json.dumps(sorted(named, key=lambda d: d["score"], reverse=True)).encode("utf-8")

    def finalize(self):
        pass
