"""Engines run an artifact's graph. ``open_engine`` picks one for a device (``select.py``: onnxruntime, or a TensorRT
plan from ``kiln build`` when ``device`` is ``auto`` or ``tensorrt``)."""

from __future__ import annotations

from kiln.runtime.engines.base import Engine, TensorInfo
from kiln.runtime.engines.select import open_engine


def group_outputs(outputs: dict) -> dict:
    """Regroup ``hidden_states.{i}`` / ``attentions.{i}`` engine outputs into tuples, as transformers returns them."""
    grouped, indexed = {}, {}
    for name, value in outputs.items():
        key, _, index = name.partition(".")
        if index.isdigit():
            indexed.setdefault(key, {})[int(index)] = value
        else:
            grouped[name] = value
    for key, items in indexed.items():
        grouped[key] = tuple(items[i] for i in sorted(items))
    return grouped


__all__ = ["Engine", "TensorInfo", "group_outputs", "open_engine"]
