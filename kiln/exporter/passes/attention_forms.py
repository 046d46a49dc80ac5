"""Encoder attention in the form a target runs fastest, chosen by measurement (``benchmarks/bench_attention_forms.py``).

torch.onnx writes each layer as ``MatMul+Add`` for q, k and v, each followed by ``Reshape -> Transpose`` to
(B, H, T, D), one standard ONNX ``Attention`` node, then ``Transpose -> Reshape`` back to (B, T, C), with a bool
(B, 1, T, T) mask expanded from ``attention_mask``. The forms:

- ``onnx``: that graph, as traced.
- ``onnx-3d``: the same ``Attention`` op fed (B, T, C) directly (``q_num_heads``/``kv_num_heads``), without the four
  Reshape/Transpose pairs per layer. Still standard ONNX.
- ``onnx-packed``: ``onnx-3d`` with q, k and v from one (C, 3C) MatMul and a Split.
- ``contrib``: onnxruntime's ``com.microsoft.Attention``: the input projection inside the op (one packed GEMM), the
  raw (B, T) ``attention_mask`` as its mask, output (B, T, C). The form onnxruntime's own BERT fusions produce.
- ``contrib-mha``: onnxruntime's ``com.microsoft.MultiHeadAttention``: q, k, v from their own MatMuls (bias-free), the
  three biases added inside the op, the raw (B, T) mask as ``key_padding_mask``, output (B, T, C); the op that
  onnxruntime's CUDA provider runs with its flash/memory-efficient attention kernels.
- ``decomposed``: MatMul, Where (mask), Softmax, MatMul: no fused node, but the two activation products become
  ordinary MatMuls that int8 quantization can take (as Optimum's int8 export does).

Each rewrite applies to a layer only where the pattern is exactly the one above (any other layer is left as it is and
counted), so the result computes the same function; the exporter validates it against the reference like any graph.
Attention that returns probabilities (``--output-attentions``) or has a KV cache is never rewritten.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

log = logging.getLogger("kiln")
FORMS = ("onnx", "onnx-3d", "onnx-packed", "contrib", "contrib-mha", "decomposed")


def rewrite(model: ir.Model, form: str) -> dict:
    """Rewrite ``model``'s encoder attention into ``form`` in place; returns {"rewritten": n, "kept": m}."""
    if form not in FORMS:
        raise ValueError(f"attention form {form!r}: choose one of {', '.join(FORMS)}")
    counts = {"rewritten": 0, "kept": 0}
    if form == "onnx":
        return counts
    graph, mask_cache = model.graph, {}
    for node in [n for n in graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]:
        layer = _match(node)
        if layer is None:
            counts["kept"] += 1
            continue
        if form == "decomposed":
            new = _decomposed(graph, node, layer)
            ir.convenience.replace_all_uses_with(node.outputs[0], new, replace_graph_outputs=True)
            counts["rewritten"] += 1
            continue
        if form in ("contrib", "contrib-mha"):
            mask = _raw_mask(graph, node.inputs[3], mask_cache)
            if mask is None:
                counts["kept"] += 1
                continue
            new = (_contrib if form == "contrib" else _multi_head)(graph, node, layer, mask)
        else:
            new = _standard_3d(graph, node, layer, packed=form == "onnx-packed")
        out = layer["out"]
        ir.convenience.replace_all_uses_with(out, new, replace_graph_outputs=True)
        counts["rewritten"] += 1
    if form.startswith("contrib") and counts["rewritten"]:
        model.opset_imports["com.microsoft"] = 1
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)  # the old projections, reshapes and weights
    log.info("attention form %s: %d layer(s) rewritten, %d kept as traced", form, counts["rewritten"], counts["kept"])
    return counts


def to_4d(model: ir.Model) -> int:
    """The inverse for runtimes that want (B, H, T, D) attention inputs (TensorRT's ONNX parser is only known to take
    those): every 3-D standard ``Attention`` node gets Reshape/Transpose to 4-D around it again. Returns how many."""
    graph, count = model.graph, 0
    for node in [n for n in graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]:
        heads = node.attributes.get_int("q_num_heads", 0)
        kv_heads = node.attributes.get_int("kv_num_heads", 0)
        if not heads:  # q_num_heads is set on 3-D attention only
            continue
        nodes, heads_of = [], {0: heads, 1: kv_heads, 2: kv_heads}

        def constant(values):
            nodes.append(ir.node("Constant", [], attributes={"value": ir.tensor(np.asarray(values, np.int64))},
                                 name=f"{node.name}_shape_{len(nodes)}"))
            return nodes[-1].outputs[0]

        for index in range(3):
            # A decoder's q and k pass through a 3-D RotaryEmbedding (decoder_3d): go 4-D before it instead.
            rotary = node.inputs[index].producer()
            if rotary is None or rotary.op_type != "RotaryEmbedding" or "num_heads" not in rotary.attributes:
                rotary = None
            consumer, slot = (rotary, 0) if rotary is not None else (node, index)
            split = ir.node("Reshape", [consumer.inputs[slot], constant([0, 0, heads_of[index], -1])],
                            name=f"{node.name}_4d_reshape_{index}")
            transpose = ir.node("Transpose", [split.outputs[0]], attributes={"perm": [0, 2, 1, 3]},
                                name=f"{node.name}_4d_transpose_{index}")
            nodes += [split, transpose]
            x = consumer.inputs[slot]
            consumer.replace_input_with(slot, transpose.outputs[0])
            heads_4d = _heads_shape(x.shape, heads_of[index])  # (B, H, T, D), for passes that check ranks
            if heads_4d is not None and x.dtype is not None:
                transpose.outputs[0].shape, transpose.outputs[0].dtype = heads_4d, x.dtype
            if rotary is not None:
                rotary.attributes.pop("num_heads")
                rotary.outputs[0].shape = heads_4d
                graph.insert_before(rotary, nodes)
                nodes = []
        merged_shape = constant([0, 0, -1])
        graph.insert_before(node, nodes)
        out = node.outputs[0]
        back = ir.node("Transpose", [out], attributes={"perm": [0, 2, 1, 3]}, name=f"{node.name}_3d_transpose")
        merge = ir.node("Reshape", [back.outputs[0], merged_shape], name=f"{node.name}_3d_reshape")
        graph.insert_after(node, [back, merge])
        ir.convenience.replace_all_uses_with(out, merge.outputs[0], replace_graph_outputs=True)
        back.replace_input_with(0, out)  # the new Transpose reads the node's output itself
        merge.outputs[0].shape, merge.outputs[0].dtype = out.shape, out.dtype
        out.shape = None
        for name in ("q_num_heads", "kv_num_heads"):
            node.attributes.pop(name, None)
        count += 1
    return count


def _heads_shape(shape: ir.Shape | None, heads: int) -> ir.Shape | None:
    """(B, T, H * D) -> (B, H, T, D), or None when the width is not known."""
    if shape is None or len(shape) != 3 or not isinstance(shape[2], int):
        return None
    return ir.Shape([shape[0], heads, shape[1], shape[2] // heads])


def decoder_3d(model: ir.Model) -> int:
    """Decoder attention with a KV cache fed (B, T, C) straight from its projections: per layer the Reshape/Transpose
    pairs of q, k, v and of the output go away (eight nodes a decode step pays for in each layer), RotaryEmbedding
    rotates the 3-D q and k itself (``num_heads``) and the standard ``Attention`` takes them with ``q_num_heads`` /
    ``kv_num_heads``; the cache inputs and outputs stay (B, Hkv, S, D). Run after ``rotary.fuse_rotary``; a layer not
    in exactly that traced form is left alone. ``to_4d`` is the inverse. Returns the layers rewritten."""
    count = 0
    for node in [n for n in model.graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]:
        layer = _match_decoder(node)
        if layer is None:
            continue
        for index, (x, rotary) in enumerate(layer["inputs"]):
            if rotary is None:
                node.replace_input_with(index, x)
                continue
            rotary.replace_input_with(0, x)
            rotary.attributes["num_heads"] = ir.AttrInt64("num_heads", layer["heads"][index])
            rotary.outputs[0].shape = x.shape
        node.attributes["q_num_heads"] = ir.AttrInt64("q_num_heads", layer["heads"][0])
        node.attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", layer["heads"][1])
        out = node.outputs[0]
        ir.convenience.replace_all_uses_with(layer["out"], out, replace_graph_outputs=True)
        out.shape = layer["out"].shape
        count += 1
    if count:
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
    log.info("decoder attention: %d layer(s) fed (B, T, C)", count)
    return count


def _single_use(value: ir.Value, op: str) -> ir.Node | None:
    """The one node that reads ``value``, if it is an ``op`` node and ``value`` is not a graph output."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output() or uses[0].node.op_type != op:
        return None
    return uses[0].node


def _from_heads(value: ir.Value) -> ir.Value | None:
    """x for ``value = Transpose(Reshape(x), perm=[0, 2, 1, 3])``, each read once, else None."""
    t = value.producer()
    if t is None or t.op_type != "Transpose" or list(t.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    r = t.inputs[0].producer()
    if r is None or r.op_type != "Reshape" or len(value.uses()) != 1 or len(t.inputs[0].uses()) != 1:
        return None
    return r.inputs[0]


def _match_decoder(node: ir.Node) -> dict | None:
    """The traced decoder pattern around one KV-cache Attention node (after fuse_rotary), or None."""
    if len(node.inputs) < 6 or node.inputs[4] is None or node.attributes.get_int("q_num_heads", 0):
        return None
    if len(node.outputs) > 3 and node.outputs[3] is not None and node.outputs[3].uses():
        return None  # probabilities are used
    shapes = [v.shape for v in node.inputs[:2]]
    if any(s is None or len(s) != 4 or not isinstance(s[1], int) for s in shapes):
        return None
    inputs = []
    for index, value in enumerate(node.inputs[:3]):
        rotary = value.producer() if index < 2 else None
        if rotary is not None:
            if rotary.op_type != "RotaryEmbedding" or rotary.attributes.get_int("interleaved", 0) or \
                    "num_heads" in rotary.attributes or len(value.uses()) != 1 or \
                    (len(rotary.inputs) > 3 and rotary.inputs[3] is not None):
                return None
            value = rotary.inputs[0]
        x = _from_heads(value)
        if x is None:
            return None
        inputs.append((x, rotary))
    t = _single_use(node.outputs[0], "Transpose")
    if t is None or list(t.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    r = _single_use(t.outputs[0], "Reshape")
    if r is None:
        return None
    return {"inputs": inputs, "heads": (shapes[0][1], shapes[1][1], shapes[1][1]), "out": r.outputs[0]}


def _match(node: ir.Node) -> dict | None:
    """The traced encoder pattern around one Attention node, or None."""
    if len(node.inputs) < 4 or any(v is not None for v in node.inputs[4:]):
        return None  # a KV cache or extra inputs
    if any(o is not None and (o.uses() or o.is_graph_output()) for o in node.outputs[1:]):
        return None  # presents or probabilities are used
    if node.attributes.get_int("is_causal", 0) or node.attributes.get_float("softcap", 0.0):
        return None
    q_shape = node.inputs[0].shape
    if q_shape is None or len(q_shape) != 4 or not isinstance(q_shape[1], int) or not isinstance(q_shape[3], int):
        return None
    heads, head_dim = q_shape[1], q_shape[3]
    projections = []
    for value in node.inputs[:3]:
        t = value.producer()
        if t is None or t.op_type != "Transpose" or list(t.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
            return None
        r = t.inputs[0].producer()
        if r is None or r.op_type != "Reshape" or len(value.uses()) != 1:
            return None
        add = r.inputs[0].producer()
        mm = add.inputs[0].producer() if add is not None and add.op_type == "Add" else None
        if mm is None or mm.op_type != "MatMul":
            return None
        weight, bias = mm.inputs[1], add.inputs[1]
        if weight.const_value is None or bias.const_value is None:
            return None
        projections.append({"x": mm.inputs[0], "W": weight, "b": bias, "y": add.outputs[0]})
    if len({id(p["x"]) for p in projections}) != 1 or node.inputs[1].shape[1] != heads:
        return None  # q, k, v from one input, as many kv heads as query heads
    uses = node.outputs[0].uses()
    t = uses[0].node if len(uses) == 1 else None
    if t is None or t.op_type != "Transpose" or list(t.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    r_uses = t.outputs[0].uses()
    r = r_uses[0].node if len(r_uses) == 1 else None
    if r is None or r.op_type != "Reshape":
        return None
    return {"heads": heads, "head_dim": head_dim, "projections": projections, "out": r.outputs[0],
            "scale": node.attributes.get_float("scale", None)}


def _scale_attribute(layer: dict) -> dict:
    return {} if layer["scale"] is None else {"scale": layer["scale"]}


def _standard_3d(graph: ir.Graph, node: ir.Node, layer: dict, packed: bool) -> ir.Value:
    heads, nodes = layer["heads"], []
    if packed:
        x = layer["projections"][0]["x"]
        weight = _initializer(graph, f"{node.name}.qkv.weight",
                              np.concatenate([p["W"].const_value.numpy() for p in layer["projections"]], axis=1))
        bias = _initializer(graph, f"{node.name}.qkv.bias",
                            np.concatenate([p["b"].const_value.numpy() for p in layer["projections"]]))
        mm = ir.node("MatMul", [x, weight], name=f"{node.name}_qkv_matmul")
        add = ir.node("Add", [mm.outputs[0], bias], name=f"{node.name}_qkv_add")
        split = ir.node("Split", [add.outputs[0]], attributes={"axis": -1, "num_outputs": 3}, num_outputs=3,
                        name=f"{node.name}_qkv_split")
        nodes += [mm, add, split]
        q, k, v = split.outputs
    else:
        q, k, v = (p["y"] for p in layer["projections"])
    attention = ir.node("Attention", [q, k, v, node.inputs[3]], name=f"{node.name}_3d",
                        attributes={"q_num_heads": heads, "kv_num_heads": heads, **_scale_attribute(layer)})
    graph.insert_before(node, [*nodes, attention])
    out = attention.outputs[0]
    out.shape, out.dtype = layer["out"].shape, layer["out"].dtype
    return out


def _decomposed(graph: ir.Graph, node: ir.Node, layer: dict) -> ir.Value:
    """softmax(q k^T * scale, masked) v on the traced (B, H, T, D) inputs; masked scores get float32's minimum, as
    the references do (a fully masked row averages v rather than producing NaN)."""
    q, k, v, mask = node.inputs[:4]
    scale = layer["scale"] if layer["scale"] is not None else 1.0 / float(np.sqrt(layer["head_dim"]))
    nodes = []

    def add(op, inputs, **attributes):
        nodes.append(ir.node(op, inputs, attributes=attributes, name=f"{node.name}_{op.lower()}_{len(nodes)}"))
        return nodes[-1].outputs[0]

    def constant(value):
        nodes.append(ir.node("Constant", [], attributes={"value": ir.tensor(np.asarray(value, np.float32))},
                             name=f"{node.name}_const_{len(nodes)}"))
        return nodes[-1].outputs[0]

    scores = add("Mul", [add("MatMul", [q, add("Transpose", [k], perm=[0, 1, 3, 2])]), constant(scale)])  # (B,H,T,S)
    scores = add("Where", [mask, scores, constant(np.finfo(np.float32).min)])
    out = add("MatMul", [add("Softmax", [scores], axis=-1), v])  # (B, H, T, D)
    graph.insert_before(node, nodes)
    out.shape, out.dtype = node.outputs[0].shape, node.outputs[0].dtype
    return out


def _contrib(graph: ir.Graph, node: ir.Node, layer: dict, mask: ir.Value) -> ir.Value:
    x = layer["projections"][0]["x"]
    weight = _initializer(graph, f"{node.name}.qkv.weight",
                          np.concatenate([p["W"].const_value.numpy() for p in layer["projections"]], axis=1))
    bias = _initializer(graph, f"{node.name}.qkv.bias",
                        np.concatenate([p["b"].const_value.numpy() for p in layer["projections"]]))
    attention = ir.node("Attention", [x, weight, bias, mask], domain="com.microsoft", name=f"{node.name}_contrib",
                        attributes={"num_heads": layer["heads"], **_scale_attribute(layer)})
    graph.insert_before(node, attention)
    out = attention.outputs[0]
    out.shape, out.dtype = layer["out"].shape, layer["out"].dtype
    return out


def _multi_head(graph: ir.Graph, node: ir.Node, layer: dict, mask: ir.Value) -> ir.Value:
    projected = [p["y"].producer().inputs[0] for p in layer["projections"]]  # MatMul outputs, before their Adds
    bias = _initializer(graph, f"{node.name}.qkv.bias",
                        np.concatenate([p["b"].const_value.numpy() for p in layer["projections"]]))
    attention = ir.node("MultiHeadAttention", [*projected, bias, mask], domain="com.microsoft", name=f"{node.name}_mha",
                        attributes={"num_heads": layer["heads"], **_scale_attribute(layer)})
    graph.insert_before(node, attention)
    out = attention.outputs[0]
    out.shape, out.dtype = layer["out"].shape, layer["out"].dtype
    return out


def _raw_mask(graph: ir.Graph, mask: ir.Value, cache: dict) -> ir.Value | None:
    """The int32 (B, S) padding mask behind a bool (B, 1, T, S) mask built as
    ``Expand(Cast(Unsqueeze(attention_mask, [1, 2])))``; None if the mask is anything else."""
    if mask in cache:
        return cache[mask]
    chain, value = [], mask
    while value is not None and value.producer() is not None and value.producer().op_type in ("Expand", "Cast"):
        chain.append(value.producer())
        value = value.producer().inputs[0]
    unsqueeze = value.producer() if value is not None else None
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or not unsqueeze.inputs[0].is_graph_input():
        cache[mask] = None
        return None
    axes = unsqueeze.inputs[1].const_value if len(unsqueeze.inputs) > 1 and unsqueeze.inputs[1] is not None else None
    if axes is None or sorted(axes.numpy().tolist()) != [1, 2]:
        cache[mask] = None
        return None
    cast = ir.node("Cast", [unsqueeze.inputs[0]], attributes={"to": ir.DataType.INT32}, name="kiln_mask_index")
    graph.insert_after(unsqueeze, cast)
    cast.outputs[0].name = "kiln_mask_index"
    cache[mask] = cast.outputs[0]
    return cache[mask]


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(array.astype(np.float32), name=name))
    graph.register_initializer(value)
    return value
