"""Trace a JAX (flax nnx) reference into ONNX with jax2onnx at opset >= 23.

The references call ``flax.nnx.dot_product_attention``, which jax2onnx turns into one standard ONNX ``Attention``
node per layer at opset 23+ (``graphs/attention_jax.py`` says when). Dynamic axes are jax symbolic dimensions named
after the spec (``total_sequence`` is the expression ``past_sequence + sequence``, so its shape checks hold while
tracing); the graph's inputs and outputs are then renamed to the spec's axes.

JAX computes in 32 bits by default, so the model is traced with int32 ids and masks and each int64 input of the
spec is cast to int32 inside the graph: the artifact takes int64 like the torch one, and x64 is never switched on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kiln.errors import ExportError
from kiln.exporter.specs import ExportSpec, model_inputs, name_axes, output_flags, pick
from kiln.kernels.attention.onnx import MIN_OPSET

log = logging.getLogger("kiln")
TRACE_DTYPES = {"int64": np.int32, "int32": np.int32, "float32": np.float32}  # spec dtype -> traced dtype


def reference_runner(model, output_names):
    """``run(feed) -> {output name: array}``: the reference on a NumPy feed, outputs named as in the graph. Compiled
    once per feed shape (``jax.jit`` over the model's state): op-by-op dispatch is several times slower on the
    validator's five shapes."""
    from flax import nnx

    output_names, flags = list(output_names), output_flags(output_names)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, feed: dict) -> dict:
        out = nnx.merge(graphdef, state)(**model_inputs(list(feed), list(feed.values())), **flags)
        return {name: pick(out, name) for name in output_names}

    def run(feed: dict) -> dict:
        out = forward(state, feed)
        return {name: np.asarray(out[name]) for name in output_names}

    return run


def trace(model, spec: ExportSpec, path: Path, opset: int = MIN_OPSET) -> Path:
    """Write ``path`` (model.onnx) and return it."""
    import onnx_ir as ir
    from jax2onnx import to_onnx

    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset} is too old: kiln needs opset >= {MIN_OPSET} for the fused ONNX Attention op.")
    dims = _symbolic_dims(spec)
    inputs = [jax.ShapeDtypeStruct(tuple(dims[a] if isinstance(a, str) else a for a in t.axes), TRACE_DTYPES[t.dtype])
              for t in spec.inputs]
    input_names, output_names = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
    flags = output_flags(output_names)

    def flat(*args):
        out = model(**model_inputs(input_names, args), **flags)
        values = []
        for name in output_names:
            value = pick(out, name)
            # One value under two names (last_hidden_state is also hidden_states.N): ONNX wants one tensor per output.
            values.append(jnp.copy(value) if any(value is v for v in values) else value)
        return tuple(values)

    try:
        graph_model = to_onnx(flat, inputs, opset=opset, return_mode="ir", input_names=input_names,
                              output_names=output_names)
    except Exception as err:  # jax tracing and the plugins raise many types; the user needs the gist and the log
        log.debug("jax2onnx.to_onnx failed", exc_info=True)
        raise ExportError(f"jax2onnx could not convert the model: {_summary(err)}. Run with --verbose for the full "
                          "log.") from err
    _cast_int64_inputs(graph_model, spec)
    name_axes(graph_model, spec)  # jax2onnx names them after the symbolic expressions
    # onnx_ir warns about each untyped intermediate value it leaves out of value_info: noise, not a problem.
    serde = logging.getLogger("onnx_ir.serde")
    level = serde.level
    serde.setLevel(logging.ERROR)
    try:
        ir.save(graph_model, str(path))
    finally:
        serde.setLevel(level)
    return path


def _symbolic_dims(spec: ExportSpec) -> dict:
    """Axis name -> jax symbolic dimension, one scope for all; derived axes (``total_sequence``) as sums."""
    names = list(spec.axes)
    dims = dict(zip(names, jax.export.symbolic_shape(", ".join(names)))) if names else {}
    for name, parts in spec.extra.get("derived_axes", {}).items():
        dims[name] = sum(dims[p] for p in parts)
    return dims


def _cast_int64_inputs(model, spec: ExportSpec) -> None:
    """Each input the spec declares int64 (traced as int32) becomes int64, followed by a Cast to int32."""
    import onnx_ir as ir

    dtypes = {t.name: t.dtype for t in spec.inputs}
    for i, narrow in enumerate(list(model.graph.inputs)):
        if dtypes[narrow.name] != "int64":
            continue
        wide = ir.Value(name=narrow.name, type=ir.TensorType(ir.DataType.INT64), shape=narrow.shape)
        narrow.name = f"{wide.name}_int32"
        model.graph.inputs[i] = wide  # the traced input, now produced by the Cast, keeps its consumers
        cast = ir.node("Cast", [wide], attributes={"to": int(ir.DataType.INT32)}, outputs=[narrow], name=narrow.name)
        model.graph.insert_before(model.graph.node(0), cast)


def _summary(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0].rstrip('.')}" if lines else type(err).__name__
