"""Logits to scores: the one softmax (and sigmoid) of the runtime, shared by generation and the task pipelines."""

from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis, shifted by its maximum so that exp cannot overflow; keeps the input's float dtype."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def default_function(problem_type: str | None, num_labels: int) -> str:
    """What a classifier's logits become by default, by config.json's ``problem_type``: transformers' rule for text
    and image classification alike (regression: the raw values; multi-label or a single label: sigmoid)."""
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    return "softmax"
