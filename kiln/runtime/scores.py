"""Logits to scores: the one softmax (and sigmoid) of the runtime, shared by generation and the task pipelines."""

from __future__ import annotations

import numpy as np

from kiln.errors import InputError

FUNCTIONS = ("softmax", "sigmoid", "none")  # a classifier's function_to_apply, as transformers names them


def softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis, shifted by its maximum so that exp cannot overflow; keeps the input's float dtype."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (a zero row stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def default_function(problem_type: str | None, num_labels: int) -> str:
    """What a classifier's logits become by default, by config.json's ``problem_type``: transformers' rule for text
    and image classification alike (regression: the raw values; multi-label or a single label: sigmoid)."""
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    return "softmax"


def check_function(function_to_apply) -> str:
    """A classifier's ``function_to_apply`` option, lower-cased; an InputError for one not in ``FUNCTIONS``."""
    if not isinstance(function_to_apply, str) or function_to_apply.lower() not in FUNCTIONS:
        raise InputError(f"function_to_apply must be one of {FUNCTIONS}, got {function_to_apply!r}.")
    return function_to_apply.lower()


def apply_function(logits: np.ndarray, function: str | None, problem_type: str | None) -> np.ndarray:
    """A classifier's scores (..., num_labels) from its logits: ``function`` (one of ``FUNCTIONS``), or when None
    the default for config.json's ``problem_type`` and the number of labels."""
    function = function or default_function(problem_type, logits.shape[-1])
    return {"softmax": softmax, "sigmoid": sigmoid, "none": lambda x: x}[function](logits)
