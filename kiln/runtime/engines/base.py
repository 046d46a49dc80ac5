"""The engine interface: open, inputs()/outputs() metadata, run(feed, outputs, keep) -> dict, release, close.

``keep`` is how a caller leaves tensors on the engine's side between runs (a decoder's KV cache, later an
encoder-decoder's cross-attention keys and values): the outputs it names come back as opaque handles that a later
``run`` takes as inputs, with no copy through numpy. What a handle is belongs to the engine: an onnxruntime
``OrtValue``, a TensorRT ``DeviceBuffer``, or a plain array for an engine that keeps nothing (a test fake).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kiln.errors import InputError


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

    def run(self, feed: dict, outputs: list[str] | None = None, keep=(), into: dict | None = None) -> dict:
        """Run the graph on ``feed`` (numpy arrays, or handles from an earlier run). Returns ``outputs`` (default:
        all) as numpy arrays, and the outputs named in ``keep`` as handles. ``into`` (output name -> array): write
        those outputs into the given host arrays (only onnxruntime's engine, for graphs with a KV cache written in
        place, which only onnxruntime runs)."""

    def release(self) -> None:
        """Drop what the calling thread still holds from its runs (the last inputs and kept outputs)."""

    def close(self) -> None: ...


def output_names(known: list[str], outputs: list[str] | None, keep, what: str = "graph") -> list[str]:
    """The outputs a run returns: those asked for (default: all ``known``), then any kept ones not among them; an
    InputError for a name that is not among ``known`` (``what`` says whose outputs they are in the message)."""
    names = list(outputs or known)
    names += [name for name in keep if name not in names]
    if outputs or keep:  # the default, all known outputs, needs no check
        known_set = set(known)
        unknown = [name for name in names if name not in known_set]
        if unknown:
            raise InputError(f"The {what} has no output(s) {unknown}; its outputs are {list(known)}.")
    return names


def cache_buffer(cache, capacity: int) -> np.ndarray:
    """A zeroed (B, H, ``capacity``, D) buffer holding ``cache`` (B, H, P, D) in its first P positions: the KV cache
    buffer a decoder whose cache is written in place takes as its past (kiln.exporter.passes.cache_in_place)."""
    cache = np.asarray(cache)
    buffer = np.zeros((*cache.shape[:2], capacity, cache.shape[3]), dtype=cache.dtype)
    buffer[:, :, :cache.shape[2]] = cache
    return buffer


def check_head_mask(mask: np.ndarray) -> None:
    """transformers' head_mask multiplies attention probabilities: values outside 0..1 (or NaN) are refused, by the
    pipelines when a call gives one and by the engine when a feed holds one."""
    if mask.size and not (np.isfinite(mask).all() and mask.min() >= 0 and mask.max() <= 1):
        raise InputError("head_mask values must be between 0 (mask the head) and 1 (keep it).")
