"""The ONNX forms of kiln's attention: translations used by the exporter and the opset rules they follow.

Opset 23 introduced the standard ``Attention`` op (opset 24 revised it). Its inputs are Q, K, V (4-D: B, H, T, D),
an optional ``attn_mask`` (bool, True = attend, or additive float; onnxruntime requires the query axis of the mask to
equal T, so masks are expanded, not broadcast, along it), optional past key/value; its outputs are Y, present
key/value, and ``qk_matmul_output`` whose content ``qk_matmul_output_mode`` selects (3 = after softmax: the
probabilities transformers returns as ``attentions``).
"""

from __future__ import annotations

MIN_OPSET = 23
QK_OUTPUT_AFTER_SOFTMAX = 3


def attention_probs_translation(opset: int = MIN_OPSET):
    """torch.onnx translation of ``torch.ops.kiln.attention_probs``: one Attention node returning (Y, probs)."""
    from onnxscript import opset23

    def attention_probs(q, k, v, mask, scale: float):
        y, _, _, probs = opset23.Attention(q, k, v, mask, scale=scale, qk_matmul_output_mode=QK_OUTPUT_AFTER_SOFTMAX)
        return y, probs

    return attention_probs


def attention_kv_translation(opset: int = MIN_OPSET):
    """torch.onnx translation of ``torch.ops.kiln.attention_kv``: one Attention node with past in, present out."""
    from onnxscript import opset23

    def attention_kv(q, k, v, mask, past_key, past_value, scale: float, softcap: float = 0.0):
        if softcap:  # 0, the attribute's default, means none: left out so that other graphs stay as they were
            y, present_key, present_value, _ = opset23.Attention(q, k, v, mask, past_key, past_value, scale=scale,
                                                                 softcap=softcap)
        else:
            y, present_key, present_value, _ = opset23.Attention(q, k, v, mask, past_key, past_value, scale=scale)
        return y, present_key, present_value

    return attention_kv


def translation_table(opset: int = MIN_OPSET) -> dict:
    """custom_translation_table entries for torch.onnx.export (needs torch)."""
    import torch

    import kiln.kernels.attention.torch_ops  # noqa: F401  registers torch.ops.kiln.*

    return {torch.ops.kiln.attention_probs.default: attention_probs_translation(opset),
            torch.ops.kiln.attention_kv.default: attention_kv_translation(opset)}
