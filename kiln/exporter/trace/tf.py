"""Trace a keras (TensorFlow) reference into ONNX with tf2onnx.

The reference is called inside a ``tf.function`` whose input signature has ``None`` for every dynamic axis, and
tf2onnx converts that function (its keras-3 ``from_keras`` path is unreliable). tf2onnx 1.17 writes opset 18 at most
and knows no fused attention op, so attention stays MatMul/Softmax: the exporter records it as ``decomposed``.
Inputs and outputs are then named, ordered and given axis names exactly as the spec says, as ``trace.torch`` does.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

# layers_tf first: it loads triton before TensorFlow (see there), and hands over tf.
from kiln.graphs.layers_tf import tf  # noqa: E402  # isort: skip

import numpy as np  # noqa: E402

from kiln.artifact import weights_file  # noqa: E402
from kiln.errors import ExportError  # noqa: E402
from kiln.exporter.specs import ExportSpec, model_inputs, output_flags, pick  # noqa: E402

log = logging.getLogger("kiln")
# Above this the protobuf limit (2 GB) is near: weights go to model.onnx.data (as trace.torch does).
EXTERNAL_DATA_BYTES = 1_500_000_000
# tf2onnx holds the frozen graph, weights included, in single protobufs, which cannot exceed 2 GB; its large-model
# mode would lift that but calls np.product, which NumPy 2 removed.
MAX_WEIGHT_BYTES = 2_000_000_000


def reference_runner(model, output_names):
    """``run(feed) -> {output name: array}``: the reference on a NumPy feed, outputs named as in the graph."""
    output_names, flags = list(output_names), output_flags(output_names)

    def run(feed: dict) -> dict:
        out = model(**model_inputs(list(feed), [tf.constant(v) for v in feed.values()]), **flags)
        return {name: pick(out, name).numpy() for name in output_names}

    return run


def max_opset() -> int:
    """The highest ONNX opset this tf2onnx can write (18 for tf2onnx 1.17)."""
    from tf2onnx import constants

    return max(constants.OPSET_TO_IR_VERSION)


def trace(model, spec: ExportSpec, path: Path, opset: int = 23) -> Path:
    """Write ``path`` (model.onnx) and return it. An opset above tf2onnx's highest is lowered to that (and logged);
    the graph's own opset is what the artifact records."""
    import onnx
    import onnx_ir as ir
    import tf2onnx

    weight_bytes = sum(int(np.prod(v.shape)) * 4 for _, v in model.named_parameters())  # float32
    if weight_bytes > MAX_WEIGHT_BYTES:
        raise ExportError(f"The model's weights ({weight_bytes / 1e9:.1f} GB) exceed the 2 GB that tf2onnx can convert "
                          "(its large-model mode fails under NumPy 2). Export with --framework torch.")
    if opset > max_opset():
        log.info("tf2onnx %s writes opset %d at most; converting at %d instead of %d.", tf2onnx.__version__,
                 max_opset(), max_opset(), opset)
        opset = max_opset()
    input_names, output_names = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
    flags = output_flags(output_names)
    signature = [tf.TensorSpec([None if isinstance(a, str) else a for a in t.axes], tf.as_dtype(t.dtype), name=t.name)
                 for t in spec.inputs]

    @tf.function(input_signature=signature)
    def flat(*args):  # positional inputs in spec order -> a tuple of outputs in spec order
        out = model(**model_inputs(input_names, args), **flags)
        return tuple(pick(out, name) for name in output_names)

    try:
        with _converting():
            proto, _ = tf2onnx.convert.from_function(flat, input_signature=signature, opset=opset)
    except Exception as err:  # tf2onnx and TensorFlow raise many types; the user needs the gist and the log
        log.debug("tf2onnx conversion failed", exc_info=True)
        raise ExportError(f"tf2onnx could not convert the model: {_summary(err)}. "
                          "Run with --verbose for the full log.") from err
    unconverted = _unconverted_ops(proto, opset)
    if unconverted:
        raise ExportError(f"tf2onnx could not convert the TensorFlow ops {', '.join(unconverted)} at opset {opset}.")
    # tf2onnx types only the graph's inputs and outputs; passes (fp16/bf16) need every value's type.
    model_ir = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))
    _name_inputs_and_outputs(model_ir, spec)
    ir.save(model_ir, path, external_data=weights_file(path).name if weight_bytes > EXTERNAL_DATA_BYTES else None)
    return path


@contextlib.contextmanager
def _converting():
    """tf2onnx's settings for one conversion, restored afterwards. Logs: tf2onnx reports every step at INFO and
    TensorFlow warns about its own deprecations while freezing the graph; keep them to warnings and errors (everything
    with --verbose). Errors: by default tf2onnx deep-copies the whole graph, weights included, before each of its ~24
    optimizer passes so that it can undo one that fails (half of MiniLM's conversion time, and twice the memory);
    kiln lets such a failure raise instead, unless TF2ONNX_CATCH_ERRORS is set."""
    from tf2onnx.constants import ENV_TF2ONNX_CATCH_ERRORS

    floors = {"tf2onnx": logging.WARNING, "tensorflow": logging.ERROR}
    saved = {name: logging.getLogger(name).level for name in floors}
    if not log.isEnabledFor(logging.DEBUG):
        for name, floor in floors.items():
            logging.getLogger(name).setLevel(max(logging.getLogger(name).getEffectiveLevel(), floor))
    own_setting = ENV_TF2ONNX_CATCH_ERRORS not in os.environ
    if own_setting:
        os.environ[ENV_TF2ONNX_CATCH_ERRORS] = "FALSE"
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        if own_setting:
            del os.environ[ENV_TF2ONNX_CATCH_ERRORS]


def _unconverted_ops(proto, opset: int) -> list[str]:
    """tf2onnx leaves TensorFlow ops it cannot convert in the graph, as they are, and only logs them: the op types
    that ONNX does not define at ``opset``."""
    import onnx

    missing = set()
    for node in proto.graph.node:
        try:
            onnx.defs.get_schema(node.op_type, opset, node.domain)
        except onnx.defs.SchemaError:
            missing.add(node.op_type)
    return sorted(missing)


def _summary(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _name_inputs_and_outputs(model, spec: ExportSpec) -> None:
    """tf2onnx names outputs after TensorFlow tensors (Identity_3:0) and dynamic dims unk__12: rename them in spec
    order, check their dtypes and give every input and output the spec's axis names (``batch``, ``sequence``, ...)."""
    import onnx_ir as ir

    graph = model.graph
    for values, tensors, what in ((graph.inputs, spec.inputs, "inputs"), (graph.outputs, spec.outputs, "outputs")):
        if len(values) != len(tensors):
            raise ExportError(f"tf2onnx wrote {len(values)} graph {what}, the spec has {len(tensors)}: "
                              f"{[v.name for v in values]} vs {[t.name for t in tensors]}.")
        for value, tensor in zip(values, tensors):
            if value.dtype != ir.DataType.from_numpy(np.dtype(tensor.dtype)):
                raise ExportError(f"tf2onnx wrote {tensor.name!r} as {value.dtype}, the spec says {tensor.dtype}.")
            value.name = tensor.name
            value.shape = ir.Shape([ir.SymbolicDim(a) if isinstance(a, str) else a for a in tensor.axes])
