"""The engine interface: open, inputs()/outputs() metadata, run(feed) -> dict, close."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy dtype name: "int64", "float32", ...
    shape: tuple  # ints for fixed axes, names (str) for dynamic ones


class Engine(Protocol):
    name: str

    def inputs(self) -> list[TensorInfo]: ...

    def outputs(self) -> list[TensorInfo]: ...

    def run(self, feed: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...
