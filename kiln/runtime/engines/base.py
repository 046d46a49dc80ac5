"""The engine interface: open, inputs()/outputs() metadata, run(feed, outputs, keep) -> dict, release, close.

``keep`` is how a caller leaves tensors on the engine's side between runs (a decoder's KV cache, later an
encoder-decoder's cross-attention keys and values): the outputs it names come back as opaque handles that a later
``run`` takes as inputs, with no copy through numpy. What a handle is belongs to the engine: an onnxruntime
``OrtValue``, a TensorRT ``DeviceBuffer``, or a plain array for an engine that keeps nothing (a test fake).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy dtype name: "int64", "float32", ...
    shape: tuple  # ints for fixed axes, names (str) for dynamic ones


class Engine(Protocol):
    name: str

    def inputs(self) -> list[TensorInfo]:
        """The inputs every feed must hold."""

    def optional_inputs(self) -> list[TensorInfo]:
        """Inputs with a default that a feed may hold (kiln.json's ``optional_inputs``, e.g. ``logits_to_keep``)."""

    def outputs(self) -> list[TensorInfo]: ...

    def run(self, feed: dict, outputs: list[str] | None = None, keep=()) -> dict:
        """Run the graph on ``feed`` (numpy arrays, or handles from an earlier run). Returns ``outputs`` (default:
        all) as numpy arrays, and the outputs named in ``keep`` as handles."""

    def release(self) -> None:
        """Drop what the calling thread still holds from its runs (the last inputs and kept outputs)."""

    def close(self) -> None: ...


def output_names(known: list[str], outputs: list[str] | None, keep) -> list[str]:
    """The outputs a run returns: those asked for (default: all), then any kept ones not among them."""
    names = list(outputs or known)
    return names + [name for name in keep if name not in names]
