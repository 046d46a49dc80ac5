"""Trace a PyTorch reference into ONNX with torch.onnx (dynamo) at opset >= 23.

The references call ``F.scaled_dot_product_attention``, which torch.onnx turns into one standard ONNX ``Attention``
node per layer at opset 23+. Axes are named after the spec (``batch``, ``sequence``) so the artifact and TensorRT
profiles can refer to them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from kiln.errors import ExportError
from kiln.exporter.specs import ExportSpec, model_inputs, name_axes, output_flags, pick  # noqa: F401 (re-exported)
from kiln.kernels.attention.onnx import MIN_OPSET

log = logging.getLogger("kiln")


class _NoTorchvision(logging.Filter):
    """torch.onnx warns on every export that torchvision (which kiln does not use) is missing, four lines a time."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torchvision is not installed" not in record.getMessage()


logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(_NoTorchvision())

# Above this the protobuf limit (2 GB) is near: weights go to model.onnx.data.
EXTERNAL_DATA_BYTES = 1_500_000_000


class _Flat(torch.nn.Module):
    """Positional inputs in spec order -> a tuple of outputs in spec order (what torch.onnx wants). Output names
    like ``hidden_states.3`` index into the tuples transformers-style models return."""

    def __init__(self, model: torch.nn.Module, spec: ExportSpec):
        super().__init__()
        self.model, self.input_names, self.output_names = model, [t.name for t in spec.inputs], [t.name for t in spec.outputs]
        self.flags = output_flags(self.output_names)

    def forward(self, *args):
        out = self.model(**model_inputs(self.input_names, args), **self.flags)
        return tuple(pick(out, name) for name in self.output_names)


def reference_runner(model: torch.nn.Module, output_names):
    """``run(feed) -> {output name: array}``: the reference on a NumPy feed, outputs named as in the graph. The
    validator and the precision gate call every framework's reference through this one shape of function."""
    output_names, flags = list(output_names), output_flags(output_names)

    def run(feed: dict) -> dict:
        with torch.no_grad():
            out = model(**model_inputs(list(feed), [torch.from_numpy(v) for v in feed.values()]), **flags)
        return {name: pick(out, name).numpy() for name in output_names}

    return run


def trace(model: torch.nn.Module, spec: ExportSpec, path: Path, opset: int = MIN_OPSET) -> Path:
    """Write ``path`` (model.onnx) and return it."""
    from kiln.kernels.attention.onnx import translation_table

    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset} is too old: kiln needs opset >= {MIN_OPSET} for the fused ONNX Attention op.")
    example = spec.make_feed(spec.example_sizes(), np.random.default_rng(0))
    args = tuple(torch.from_numpy(example[t.name]) for t in spec.inputs)
    dims = {name: torch.export.Dim(name, min=r.min, max=r.max) for name, r in spec.axes.items()}
    # Axes that are sums of others (total_sequence = past_sequence + sequence): let torch.export derive them.
    dims.update({name: torch.export.Dim.AUTO for name in spec.extra.get("derived_axes", {})})
    dynamic_shapes = tuple({i: dims[a] for i, a in enumerate(t.axes) if isinstance(a, str)} for t in spec.inputs)
    wrapper = _Flat(model, spec).eval()
    captured = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, args, dynamo=True, opset_version=opset, dynamic_shapes=(dynamic_shapes,),  # one entry: *args
                input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                custom_translation_table=translation_table(opset), optimize=True, verbose=False, report=False,
            )
    except Exception as err:  # torch.export raises many types; the user needs the gist and the log
        log.debug("torch.onnx.export failed", exc_info=True)
        raise ExportError(f"torch.onnx could not trace the model: {_summary(err)}. Run with --verbose for the full log.") from err
    name_axes(program.model, spec)  # torch names them s0, s1, ... after its symbols
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=external)
    return path


def _summary(err: Exception) -> str:
    """The one line of torch.onnx's long error report that says what broke."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("## Exception summary") and i + 1 < len(lines):
            return lines[i + 1]
    return lines[0] if lines else type(err).__name__
