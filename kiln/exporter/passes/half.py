"""fp16 / bf16 written into the graph, with fp32 islands.

TensorRT 11 builds only strongly typed networks, so reduced precision is a property of the ONNX graph, not a builder
flag. This pass gives every float computation a type: the arithmetic that is safe in half precision (MatMul, Gemm,
Attention, element-wise ops, activations, data movement) runs in fp16 or bf16 with half-precision weights; the
numerically delicate ops stay fp32 (normalisations, Softmax, reductions, exponentials and everything the pass does not
know), with Casts at the borders. Graph inputs and outputs keep their fp32 type, so the runtime and the pipelines run
a half-precision artifact unchanged.

onnxruntime's CPU provider runs fp16 graphs but not bf16 ones. ``simulate=True`` writes the same graph in fp32 with
every half-precision value rounded to bf16 (or fp16) at the same places: weights stored pre-rounded, each
half-precision node's outputs passed through ``Cast(to=half) -> Cast(to=float)``. Products accumulate in fp32 there,
as they do in GPU half-precision GEMMs, so it measures the precision's accuracy on any machine.
"""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir

log = logging.getLogger("kiln")
LOW = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
# Ops that compute in the half type. Anything else (unknown ops included) stays fp32: the safe default.
HALF_OPS = {
    "MatMul", "Gemm", "Attention", "Add", "Sub", "Mul", "Div", "Neg", "Gelu", "Relu", "Tanh", "Sigmoid",
    "HardSigmoid", "Erf", "Where", "Transpose", "Reshape", "Concat", "Split", "Slice", "Gather", "Squeeze",
    "Unsqueeze", "Expand", "Identity", "Flatten", "Conv", "Max", "Min", "Clip",
}
# Ops named here for the reader: kept fp32 on purpose (not merely unknown).
FP32_OPS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
            "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceSumSquare", "Pow", "Sqrt",
            "Exp", "Log", "Cos", "Sin", "CumSum", "Range", "ConstantOfShape", "Cast", "CastLike"}
_FLOAT = ir.DataType.FLOAT
_NUMPY = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}


def convert(model: ir.Model, precision: str, *, simulate: bool = False, extra_half_ops=frozenset()) -> dict:
    """Rewrite ``model`` in place; returns {"half_nodes", "fp32_nodes", "casts", "weights"} counts.
    ``extra_half_ops``: (domain, op type) pairs outside the standard set that take half inputs (the kiln TensorRT
    attention plugin)."""
    if precision not in LOW:
        raise ValueError(f"precision {precision!r}: choose fp16 or bf16")
    low = LOW[precision]
    graph = model.graph
    half_of: dict[ir.Value, ir.Value] = {}  # fp32 value -> its half-precision twin
    float_of: dict[ir.Value, ir.Value] = {}  # half value -> its fp32 twin
    produced_half: set[ir.Value] = set()  # simulation: outputs already rounded after their half-precision node
    counts = {"half_nodes": 0, "fp32_nodes": 0, "casts": 0, "weights": 0}

    def cast(value: ir.Value, to: ir.DataType, before: ir.Node) -> ir.Value:
        counts["casts"] += 1
        node = ir.node("Cast", [value], attributes={"to": to}, name=f"{value.name}_to_{to.name.lower()}")
        graph.insert_before(before, node)
        out = node.outputs[0]
        out.name, out.shape, out.dtype = node.name, value.shape, to
        return out

    def rounded(value: ir.Value, before: ir.Node | None = None, after: ir.Node | None = None) -> ir.Value:
        """Simulation: ``value`` rounded to the half type and back, placed before or after a node."""
        down = ir.node("Cast", [value], attributes={"to": low}, name=f"{value.name}_round")
        up = ir.node("Cast", [down.outputs[0]], attributes={"to": _FLOAT}, name=f"{value.name}_rounded")
        if before is not None:
            graph.insert_before(before, [down, up])
        else:
            graph.insert_after(after, [down, up])
        counts["casts"] += 2
        out = up.outputs[0]
        out.name, out.shape, out.dtype = up.name, value.shape, _FLOAT
        return out

    def half_weight(value: ir.Value) -> ir.Value:
        # Clipped to the half type's finite range: a mask constant such as float32.min (tf2onnx writes masking as
        # scores * m + min * (1 - m)) would otherwise become -inf, and -inf * 0 is NaN.
        finfo = ml_dtypes.finfo(_NUMPY[precision])
        array = np.clip(value.const_value.numpy().astype(np.float32), float(finfo.min), float(finfo.max))
        counts["weights"] += 1
        stored = _round(array, precision) if simulate else array.astype(_NUMPY[precision])
        data = ir.tensor(stored, name=f"{value.name}_{precision}")
        new = ir.Value(name=data.name, shape=value.shape, type=ir.TensorType(_FLOAT if simulate else low),
                       const_value=data)
        graph.register_initializer(new)
        return new

    for node in list(graph):
        floats = [i for i, v in enumerate(node.inputs) if v is not None and v.dtype == _FLOAT]
        standard = node.op_type in HALF_OPS and node.domain in ("", "ai.onnx")
        if (standard or (node.domain, node.op_type) in extra_half_ops) and _float_data(node, low):
            counts["half_nodes"] += 1
            for i in floats:
                value = node.inputs[i]
                if value in produced_half:
                    continue  # simulation: already rounded where it was produced
                if value not in half_of:
                    if value.is_initializer() and value.const_value is not None:
                        half_of[value] = half_weight(value)
                    else:
                        half_of[value] = rounded(value, node) if simulate else cast(value, low, node)
                node.replace_input_with(i, half_of[value])
            for out in node.outputs:
                if out.dtype != _FLOAT:
                    continue
                if not simulate:
                    out.dtype = low
                    continue
                # Simulation: consumers read the output rounded to the half type.
                uses = list(out.uses())
                twin = rounded(out, after=node)
                for user, index in uses:
                    user.replace_input_with(index, twin)
                _move_graph_output(graph, out, twin)
                produced_half.add(twin)
        else:
            counts["fp32_nodes"] += node.op_type != "Constant"
            for i, value in enumerate(node.inputs):
                if value is not None and value.dtype == low and not simulate:
                    if value not in float_of:
                        float_of[value] = cast(value, _FLOAT, node)
                    node.replace_input_with(i, float_of[value])
    if not simulate:
        for index, out in enumerate(graph.outputs):  # the graph keeps its fp32 outputs and their names
            if out.dtype == low:
                back = ir.node("Cast", [out], attributes={"to": _FLOAT}, name=f"{out.name}_to_float")
                graph.append(back)
                name = out.name
                out.name = name + "_" + precision
                back.outputs[0].name, back.outputs[0].shape, back.outputs[0].dtype = name, out.shape, _FLOAT
                graph.outputs[index] = back.outputs[0]
                counts["casts"] += 1
    _drop_unused_initializers(graph)
    log.info("%s pass%s: %d nodes in %s, %d kept fp32, %d weights converted, %d casts", precision,
             " (simulated in fp32)" if simulate else "", counts["half_nodes"], precision, counts["fp32_nodes"],
             counts["weights"], counts["casts"])
    return counts


def _float_data(node: ir.Node, low: ir.DataType) -> bool:
    """Whether the node computes on floats (fp32, or already half): Gather's indices and Reshape's shape are ints
    and stay as they are; a node on ints alone (shape arithmetic) is left alone."""
    return any(v is not None and v.dtype in (_FLOAT, low) for v in node.inputs)


def _move_graph_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    for index, out in enumerate(graph.outputs):
        if out is old:
            name = old.name
            old.name = name + "_raw"
            new.name = name
            graph.outputs[index] = new


def _drop_unused_initializers(graph: ir.Graph) -> None:
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]


def _round(array: np.ndarray, precision: str) -> np.ndarray:
    """fp32 values rounded to the nearest fp16 or bf16 (round to nearest even), returned as fp32."""
    return array.astype(_NUMPY[precision]).astype(np.float32)
