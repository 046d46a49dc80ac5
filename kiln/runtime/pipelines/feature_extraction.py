"""feature-extraction: transformers' nested lists of token vectors, or pooled sentence embeddings."""

from __future__ import annotations

import numpy as np

from kiln.errors import InputError
from kiln.runtime.pipelines.base import Pipeline, given

POOLINGS = (None, "mean", "cls")


class FeatureExtractionPipeline(Pipeline):
    """``pipe(texts)`` returns what ``transformers.pipeline("feature-extraction")`` returns: per input a
    ``[1, tokens, hidden]`` nested list. ``pooling="mean"|"cls"`` returns one vector per input instead (as
    sentence-transformers does), ``normalize=True`` scales it to unit length, ``return_tensors=True`` gives arrays."""

    task = "feature-extraction"

    def _sanitize_parameters(self, truncation=None, pooling=None, normalize=None, return_tensors=None):
        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        post = {"pooling": pooling, "normalize": normalize, "return_tensors": return_tensors}
        return given(truncation=truncation), {}, given(**post)

    def preprocess(self, items, truncation: bool = True):
        return self.tokenizer(items, truncation=truncation)

    def postprocess(self, model_inputs, outputs, pooling=None, normalize: bool = False, return_tensors: bool = False):
        hidden = outputs["last_hidden_state"]  # (B, T, C)
        mask = model_inputs.attention_mask  # (B, T)
        if pooling is None:
            if normalize:
                raise InputError("normalize=True needs a pooling ('mean' or 'cls').")
            rows = [hidden[b : b + 1, mask[b].astype(bool)] for b in range(len(hidden))]  # each (1, T_b, C)
        else:
            if pooling == "mean":
                weights = mask[..., None].astype(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)  # (B, C)
            else:
                pooled = hidden[:, 0]  # (B, C), first token (CLS)
            if normalize:
                pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
            rows = list(pooled)
        return [r if return_tensors else r.tolist() for r in rows]
