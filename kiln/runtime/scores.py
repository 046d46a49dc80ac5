"""Logits to scores: the one softmax (and sigmoid) of the runtime, shared by generation and the task pipelines."""

from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis, shifted by its maximum so that exp cannot overflow; keeps the input's float dtype."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
