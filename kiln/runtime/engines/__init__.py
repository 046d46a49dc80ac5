"""Engines run an artifact's graph. ``open_engine`` picks one for a device."""

from __future__ import annotations

from kiln.runtime.engines.base import Engine, TensorInfo


def open_engine(path, device: str = "cpu", threads: int | None = None) -> Engine:
    from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine

    return OnnxRuntimeEngine(path, device=device, threads=threads)


__all__ = ["Engine", "TensorInfo", "open_engine"]
