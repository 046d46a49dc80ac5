"""``MatMul(x, Transpose(W))`` with a stored W -> ``MatMul(x, W^T)`` with W^T stored: one onnxscript rewrite rule.

torch.onnx writes a tied LM head (logits = x @ embeddings^T) this way. onnxruntime folds the Transpose at load time,
but the quantizers look for MatMuls with a constant weight and would leave the largest matrix of a small decoder in
fp32; so the precision step runs this rule first.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriteRule, RewriteRuleSet

log = logging.getLogger("kiln")


def _pattern(op, x, weight):
    return op.MatMul(x, op.Transpose(weight, _allow_other_attributes=True, _outputs=["transposed"]))


def _stored(context, x, weight, transposed, **_) -> bool:
    return weight.const_value is not None and weight.is_initializer()


def _replacement(op, x, weight, transposed, **_):
    perm = transposed.producer().attributes.get_ints("perm", None)
    array = weight.const_value.numpy()
    folded = np.ascontiguousarray(np.transpose(array, perm) if perm is not None else array.T)
    return op.MatMul(x, op.initializer(ir.tensor(folded, name=f"{weight.name}.transposed")))


RULE = RewriteRule(_pattern, _replacement, _stored, name="FoldWeightTranspose")


def fold_weight_transposes(model: ir.Model) -> int:
    """Rewrite ``model`` in place; returns how many MatMuls now read a stored, transposed weight."""
    count = RewriteRuleSet([RULE]).apply_to_model(model)
    log.info("transpose weights: %d MatMul weight(s) stored transposed", count)
    return count
