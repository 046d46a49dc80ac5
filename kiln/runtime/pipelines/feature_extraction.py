"""feature-extraction: transformers' nested lists of token vectors, or pooled sentence embeddings."""

from __future__ import annotations

import numpy as np

from kiln.errors import InputError
from kiln.runtime.dual_encoder import DualEncoder
from kiln.runtime.pipelines.base import Pipeline, given
from kiln.runtime.scores import normalize_rows

POOLINGS = (None, "mean", "cls")


class FeatureExtractionPipeline(Pipeline):
    """``pipe(texts)`` returns what ``transformers.pipeline("feature-extraction")`` returns: per input a
    ``[1, tokens, hidden]`` nested list. ``pooling="mean"|"cls"`` returns one vector per input instead (as
    sentence-transformers does), ``normalize=True`` scales it to unit length, ``return_tensors=True`` gives arrays.

    On an image + text artifact (CLIP, SigLIP) the text tower's projected embedding comes back per input, unit length
    (what it scores images with; ``normalize=False``: as transformers' ``get_text_features``), or with
    ``projected=False`` its token vectors as for any text encoder."""

    task = "feature-extraction"

    def setup(self) -> None:
        self.towers = None
        if self.manifest["task"] == "zero-shot-image-classification":
            self.towers = DualEncoder(self.path, self.manifest, self.engine, self.tokenizer, **self._open)

    def _sanitize_parameters(self, truncation=None, pooling=None, normalize=None, return_tensors=None, projected=None):
        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        if projected is not None and self.towers is None:
            raise InputError(f"projected= applies to image + text artifacts; {self.path} is a text encoder.")
        post = {"pooling": pooling, "normalize": normalize, "return_tensors": return_tensors}
        return given(truncation=truncation), given(projected=projected), given(**post)

    def preprocess(self, items, truncation: bool = True):
        if self.towers is not None:
            return items, truncation  # the tower tokenizes as it was trained (SigLIP: padded to its length)
        return self.tokenizer(items, truncation=truncation)

    def forward(self, model_inputs, batch_size: int, head_mask=None, projected: bool = True):
        if self.towers is None:
            return super().forward(model_inputs, batch_size, head_mask)
        texts, truncation = model_inputs
        if projected:
            return {"text_embeds": self.towers.text_embeddings(texts, batch_size, truncation, normalized=False)}
        batch = self.tokenizer(texts, truncation=truncation)
        return {"last_hidden_state": self.towers.text_engine.run(batch.feed(self.towers.text_inputs))[
            "last_hidden_state"], "attention_mask": batch.attention_mask}

    def postprocess(self, model_inputs, outputs, pooling=None, normalize: bool | None = None,
                    return_tensors: bool = False):
        if "text_embeds" in outputs:  # an image + text artifact's projected embeddings: unit length unless asked
            embeds = outputs["text_embeds"]
            if pooling is not None:
                raise InputError("pooling applies to token vectors; the projected embeddings are pooled already. "
                                 "Leave pooling out, or pass projected=False.")
            rows = list(normalize_rows(embeds) if normalize is not False else embeds)
            return [r if return_tensors else r.tolist() for r in rows]
        hidden = outputs["last_hidden_state"]  # (B, T, C)
        # (B, T): the text tower of an image + text artifact tokenizes in forward (projected=False)
        mask = outputs["attention_mask"] if "attention_mask" in outputs else model_inputs.attention_mask
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
                pooled = normalize_rows(pooled)
            rows = list(pooled)
        return [r if return_tensors else r.tolist() for r in rows]
