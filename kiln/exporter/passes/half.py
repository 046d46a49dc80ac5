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

import ml_dtypes
import numpy as np
import onnx_ir as ir

from kiln.exporter.passes.base import GraphPass, PassResult, Skip

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


class HalfPrecision(GraphPass):
    """Type the graph in ``precision`` (fp16 | bf16). ``extra_half_ops``: (domain, op type) pairs outside the standard
    set that take half inputs (the kiln TensorRT attention plugin). ``details`` counts the nodes in half precision,
    those kept fp32, the casts and the weights converted."""

    def __init__(self, precision: str, *, simulate: bool = False, extra_half_ops=frozenset()):
        if precision not in LOW:
            raise ValueError(f"precision {precision!r}: choose fp16 or bf16")
        self.precision, self.simulate, self.extra_half_ops = precision, simulate, frozenset(extra_half_ops)
        self.low = LOW[precision]
        self.name = precision + (" (simulated in fp32)" if simulate else "")

    def candidates(self, model):
        self.graph = model.graph
        self.half_of: dict[ir.Value, ir.Value] = {}  # fp32 value -> its half-precision twin
        self.float_of: dict[ir.Value, ir.Value] = {}  # half value -> its fp32 twin
        self.produced_half: set[ir.Value] = set()  # simulation: outputs already rounded after their half node
        self.counts = {"half_nodes": 0, "fp32_nodes": 0, "casts": 0, "weights": 0}
        return list(model.graph)

    def match(self, node: ir.Node):
        standard = node.op_type in HALF_OPS and node.domain in ("", "ai.onnx")
        if (standard or (node.domain, node.op_type) in self.extra_half_ops) and _float_data(node, self.low):
            return node
        return Skip(f"{node.op_type} stays fp32")

    def rewrite(self, model, node: ir.Node, result: PassResult) -> None:
        self.counts["half_nodes"] += 1
        for i, value in enumerate(node.inputs):
            if value is None or value.dtype != _FLOAT or value in self.produced_half:
                continue  # simulation: already rounded where it was produced
            if value not in self.half_of:
                if value.is_initializer() and value.const_value is not None:
                    self.half_of[value] = self._half_weight(value)
                else:
                    self.half_of[value] = self._rounded(value, node) if self.simulate else self._cast(value, self.low, node)
            node.replace_input_with(i, self.half_of[value])
        for out in node.outputs:
            if out.dtype != _FLOAT:
                continue
            if not self.simulate:
                out.dtype = self.low
                continue
            # Simulation: consumers read the output rounded to the half type.
            uses = list(out.uses())
            twin = self._rounded(out, after=node)
            for user, index in uses:
                user.replace_input_with(index, twin)
            _move_graph_output(self.graph, out, twin)
            self.produced_half.add(twin)

    def skipped(self, model, node: ir.Node, skip: Skip) -> None:
        self.counts["fp32_nodes"] += node.op_type != "Constant"
        for i, value in enumerate(node.inputs):
            if value is not None and value.dtype == self.low and not self.simulate:
                if value not in self.float_of:
                    self.float_of[value] = self._cast(value, _FLOAT, node)
                node.replace_input_with(i, self.float_of[value])

    def finish(self, model, result: PassResult) -> None:
        graph = model.graph
        if not self.simulate:
            for index, out in enumerate(graph.outputs):  # the graph keeps its fp32 outputs and their names
                if out.dtype == self.low:
                    back = ir.node("Cast", [out], attributes={"to": _FLOAT}, name=f"{out.name}_to_float")
                    graph.append(back)
                    name = out.name
                    out.name = name + "_" + self.precision
                    back.outputs[0].name, back.outputs[0].shape, back.outputs[0].dtype = name, out.shape, _FLOAT
                    graph.outputs[index] = back.outputs[0]
                    self.counts["casts"] += 1
        _drop_unused_initializers(graph)

    def call(self, model: ir.Model) -> PassResult:
        result = super().call(model)
        result.details.update(self.counts)
        return result

    def _cast(self, value: ir.Value, to: ir.DataType, before: ir.Node) -> ir.Value:
        self.counts["casts"] += 1
        node = ir.node("Cast", [value], attributes={"to": to}, name=f"{value.name}_to_{to.name.lower()}")
        self.graph.insert_before(before, node)
        out = node.outputs[0]
        out.name, out.shape, out.dtype = node.name, value.shape, to
        return out

    def _rounded(self, value: ir.Value, before: ir.Node | None = None, after: ir.Node | None = None) -> ir.Value:
        """Simulation: ``value`` rounded to the half type and back, placed before or after a node."""
        down = ir.node("Cast", [value], attributes={"to": self.low}, name=f"{value.name}_round")
        up = ir.node("Cast", [down.outputs[0]], attributes={"to": _FLOAT}, name=f"{value.name}_rounded")
        if before is not None:
            self.graph.insert_before(before, [down, up])
        else:
            self.graph.insert_after(after, [down, up])
        self.counts["casts"] += 2
        out = up.outputs[0]
        out.name, out.shape, out.dtype = up.name, value.shape, _FLOAT
        return out

    def _half_weight(self, value: ir.Value) -> ir.Value:
        # Clipped to the half type's finite range: a mask constant such as float32.min (tf2onnx writes masking as
        # scores * m + min * (1 - m)) would otherwise become -inf, and -inf * 0 is NaN.
        finfo = ml_dtypes.finfo(_NUMPY[self.precision])
        array = np.clip(value.const_value.numpy().astype(np.float32), float(finfo.min), float(finfo.max))
        self.counts["weights"] += 1
        stored = _round(array, self.precision) if self.simulate else array.astype(_NUMPY[self.precision])
        data = ir.tensor(stored, name=f"{value.name}_{self.precision}")
        new = ir.Value(name=data.name, shape=value.shape, type=ir.TensorType(_FLOAT if self.simulate else self.low),
                       const_value=data)
        self.graph.register_initializer(new)
        return new


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
