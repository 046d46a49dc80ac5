"""onnxruntime engine: CPU by default, CUDA when asked for (or "auto") and the provider is installed."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kiln.errors import ArtifactError, InputError
from kiln.runtime.engines.base import TensorInfo

log = logging.getLogger("kiln")

_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def providers_for(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device in ("cuda", "auto"):
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device == "cuda":
            raise InputError("device='cuda' needs onnxruntime-gpu (CUDAExecutionProvider is not available). "
                             "Install it with: pip uninstall onnxruntime && pip install 'kiln[gpu]'")
        log.info("device='auto': CUDAExecutionProvider not available, running on CPU")
        return ["CPUExecutionProvider"]
    raise InputError(f"Unknown device {device!r}; use 'cpu', 'cuda' or 'auto'.")


class OnnxRuntimeEngine:
    """One InferenceSession; ``run`` is safe to call from several threads at once (onnxruntime guarantees it)."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"No ONNX model at {path}. Re-export the artifact.")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Errors only: onnxruntime warns about shape-inference details of outputs it then produces correctly.
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        self.providers = providers_for(device)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types from pybind
            raise ArtifactError(f"onnxruntime could not load {path}: {str(err).strip()[:500]}. "
                                "The file may be corrupt or need a newer onnxruntime; re-export or upgrade.") from err
        self._inputs = [TensorInfo(i.name, _ORT_DTYPES.get(i.type, i.type), tuple(i.shape)) for i in self.session.get_inputs()]
        self._outputs = [TensorInfo(o.name, _ORT_DTYPES.get(o.type, o.type), tuple(o.shape)) for o in self.session.get_outputs()]

    def inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    def outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def run(self, feed: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        checked = {}
        for info in self._inputs:
            if info.name not in feed:
                raise InputError(f"Engine input {info.name!r} is missing from the feed (got {sorted(feed)}).")
            value = np.asarray(feed[info.name])
            if value.dtype.name != info.dtype:
                if not np.can_cast(value.dtype, info.dtype, casting="same_kind"):
                    raise InputError(f"Engine input {info.name!r} must be {info.dtype}, got {value.dtype}.")
                value = value.astype(info.dtype)
            if value.ndim != len(info.shape):
                raise InputError(f"Engine input {info.name!r} must have {len(info.shape)} dims {info.shape}, "
                                 f"got shape {value.shape}.")
            checked[info.name] = value
        names = outputs or [o.name for o in self._outputs]
        results = self.session.run(names, checked)
        return dict(zip(names, results))

    def close(self) -> None:
        self.session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
