"""Weights that already are blocks of 4 or 8 bits keep those blocks: ``MatMulNBits`` with the same integers and
scales, instead of a second quantization.

A GGUF checkpoint's Q4_0 and Q8_0 tensors are dequantized on import (``kiln.hub.gguf``): each block of 32 weights
along a row is ``d * q`` with an fp16 scale ``d`` and integers ``q`` in [-8, 7] (Q4_0) or [-127, 127] (Q8_0). The
fp32 graph holds those products exactly (a row permutation, a transpose, packing projections side by side keep
them), and onnxruntime's ``MatMulNBits`` stores the same thing: blocks of 32 along K for each of N columns, a float
scale each, and a zero point that defaults to 8 (4 bits) or 128 (8 bits) when none is given. So such a weight is
recovered block by block: the scale from the block's largest magnitude (Q4_0: it is ``-8 d``; Q8_0: ``127 |d|``),
the integers by division, and the weight is taken only when every block gives back exactly the stored values. The
rest (other types, float checkpoints) goes to onnxruntime's quantizer as before. 4 bits are tried first, then 8,
whatever the precision asked for: the file's own blocks are never worse than a second quantization. The graph then computes with the
weights as shipped: what llama.cpp computes from the same file, up to how each quantizes its activations.

Q4_1 and the K-quants (a block minimum beside the scale) are not exact in MatMulNBits' integer zero points, and its
float zero points fall to a kernel 10-40x slower (``benchmarks/bench_nbits_zero_points.py``): those weights are
quantized again.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.exporter.passes.base import GraphPass, PassResult, Skip
from kiln.exporter.passes.builder import initializer

BLOCK = 32
# bits -> (the integer the block's largest magnitude stores, with its sign; the integers' range)
FORMATS = {4: (-8, (-8, 7)), 8: (127, (-127, 127))}


def exact_blocks(weight: np.ndarray, bits: int, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray] | None:
    """(packed blocks (N, K / block, block * bits / 8) uint8, scales (N * K / block,) float32) storing ``weight``
    (K, N) exactly with MatMulNBits' default zero point, or None when some block is not ``scale * integers``."""
    if weight.dtype != np.float32 or weight.ndim != 2 or weight.shape[0] % block or not weight.size:
        return None
    k, n = weight.shape
    if _integers(weight[:, :8].T.reshape(-1, k // block, block), bits) is None:
        return None  # a few columns first: a float weight fails there, without a pass over all of it
    found = _integers(weight.T.reshape(n, k // block, block), bits)  # (N, blocks, block): MatMulNBits' order
    if found is None:
        return None
    integers, scales = found
    stored = (integers.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)  # the default zero point's offset
    if bits == 4:
        stored = stored[..., 0::2] | (stored[..., 1::2] << 4)  # two per byte, the even one in the low nibble
    return np.ascontiguousarray(stored), scales.reshape(-1)


def _integers(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(integers, scales (..., blocks)) with ``integers * scales == blocks`` exactly, or None."""
    top, (low, high) = FORMATS[bits]
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    scales = (largest / np.float32(top) if top < 0 else np.abs(largest) / np.float32(top)).astype(np.float32)
    safe = np.where(scales == 0, np.float32(1), scales)[..., None]
    integers = np.rint(blocks / safe)
    if not np.all((integers >= low) & (integers <= high)) or \
            not np.array_equal((integers * safe).astype(np.float32), blocks):
        return None
    return integers, scales


class ExactBlocks(GraphPass):
    """Each ``MatMul`` whose constant weight is exactly blocks of 4 bits, else of 8 bits (the first of ``bits`` that
    fits), becomes ``com.microsoft.MatMulNBits`` with them (``accuracy_level`` as the quantizer's: 4, activations
    quantized to int8 per block). Whatever the precision asked for: a Q4_0 file's Q8_0 output head stays 8-bit at
    int4, its Q4_0 projections stay 4-bit at int8; the precision decides only what the other weights become."""

    name = "exact blocks"

    def __init__(self, bits: tuple[int, ...] = (4, 8), accuracy_level: int = 4):
        super().__init__()
        if not bits or any(b not in FORMATS for b in bits):
            raise ValueError(f"bits must be among {sorted(FORMATS)}, not {bits}")
        self.bits, self.accuracy_level = tuple(bits), accuracy_level
        # a weight two MatMuls share is stored once: id(weight) -> (blocks, scales, bits)
        self._stored: dict[int, tuple[ir.Value, ir.Value, int]] = {}

    def candidates(self, model):
        return [n for n in model.graph if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and len(n.inputs) == 2
                and n.inputs[1] is not None and n.inputs[1].const_value is not None]

    def match(self, node):
        weight = node.inputs[1]
        if id(weight) in self._stored:
            return node, None
        array = weight.const_value.numpy()
        for bits in self.bits:
            found = exact_blocks(array, bits)
            if found is not None:
                return node, (*found, bits)
        return Skip(f"the weight is not exactly blocks of {BLOCK} of {' or '.join(map(str, self.bits))} bits")

    def rewrite(self, model, match, result: PassResult) -> None:
        node, found = match
        graph, weight = model.graph, node.inputs[1]
        k, n = weight.shape[0], weight.shape[1]
        if found is not None:
            blocks, scales, bits = found
            name = weight.name or node.name
            self._stored[id(weight)] = (initializer(graph, f"{name}_Q{bits}_exact", blocks),
                                        initializer(graph, f"{name}_Q{bits}_exact_scales", scales), bits)
            result.details[f"{bits}-bit"] = result.details.get(f"{bits}-bit", 0) + 1
        blocks, scales, bits = self._stored[id(weight)]
        nbits = ir.node("MatMulNBits", [node.inputs[0], blocks, scales], domain="com.microsoft",
                        name=f"{node.name}_Q{bits}", attributes={
                            "K": int(k), "N": int(n), "bits": bits, "block_size": BLOCK,
                            "accuracy_level": self.accuracy_level})
        graph.insert_before(node, nbits)
        out = nbits.outputs[0]
        out.dtype, out.shape = node.outputs[0].dtype, node.outputs[0].shape
        ir.convenience.replace_all_uses_with(node.outputs[0], out, replace_graph_outputs=True)
        name = node.outputs[0].name  # a graph output (the LM head's logits) keeps its name
        node.outputs[0].name, out.name = f"{name}_float", name
        graph.remove(node, safe=True)
        if not weight.uses() and weight.name in graph.initializers:
            del graph.initializers[weight.name]
        model.opset_imports.setdefault("com.microsoft", 1)
