"""fill-mask: the likeliest tokens for each mask, as transformers.pipeline("fill-mask") returns them."""

from __future__ import annotations

import logging

import numpy as np

from kiln.errors import ArtifactError, InputError
from kiln.runtime.pipelines.base import Pipeline, check_int, given
from kiln.runtime.scores import softmax

log = logging.getLogger("kiln")


class FillMaskPipeline(Pipeline):
    """``pipe("Paris is the [MASK] of France.", top_k=5, targets=None)``.

    Per input: a list of ``{score, token, token_str, sequence}`` (best first) for one mask; with several masks, one
    such list per mask (scores are per mask, not joint). A list of inputs gives one result per input, except that a
    one-item list gives that item's result, as in transformers. ``targets`` (a token or a list of them) limits the
    candidates; a target that is not one token is replaced by its first token, with a warning."""

    task = "fill-mask"

    def setup(self) -> None:
        self.mask_token, self.mask_id = self.tokenizer.mask_token, self.tokenizer.mask_token_id
        if self.mask_id is None:
            raise ArtifactError(f"The tokenizer in {self.path} defines no mask token (or its mask_token "
                                f"{self.mask_token!r} is not in the vocabulary), so it cannot fill masks. Set "
                                '"mask_token" in tokenizer_config.json to the token the model was trained with.')

    def _sanitize_parameters(self, top_k=None, targets=None, truncation=None):
        # top_k=None means the default (5), as in transformers
        if top_k is not None:
            check_int("top_k", top_k, what="a positive integer")
        post = given(top_k=top_k, target_ids=None if targets is None else self.target_ids(targets))
        return given(truncation=truncation), {}, post

    def target_ids(self, targets) -> np.ndarray:
        """Vocabulary ids of the targets; one that is not a token is replaced by its first token (or dropped)."""
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
            raise InputError(f"targets must be a string or a list of strings, got {targets!r}.")
        ids = []
        for target in targets:
            id_ = self.tokenizer.token_to_id(target)
            if id_ is None:
                pieces = self.tokenizer.encode_ids(target)
                if not pieces:
                    log.warning("The specified target token `%s` does not exist in the model vocabulary. "
                                "We cannot replace it with anything meaningful, ignoring it", target)
                    continue
                id_ = pieces[0]
                log.warning("The specified target token `%s` does not exist in the model vocabulary. "
                            "Replacing with `%s`.", target, self.tokenizer.id_to_token(id_))
            ids.append(id_)
        if not ids:
            raise InputError(f"At least one target must be provided when passed; none of {list(targets)!r} "
                             "gives a token of the model's vocabulary.")
        return np.array(list(dict.fromkeys(ids)), dtype=np.int64)

    def preprocess(self, items, truncation: bool = True):
        batch = self.tokenizer(items, truncation=truncation)
        for b in range(len(items)):
            if not (batch.input_ids[b][batch.attention_mask[b].astype(bool)] == self.mask_id).any():
                where = "the input" if len(items) == 1 else f"input {items[b][:50]!r}"
                cut = (f" (it was truncated to {self.tokenizer.max_length} tokens: put the mask earlier)"
                       if batch.truncated[b] else "")
                raise InputError(f"No mask_token ({self.mask_token}) found in {where}{cut}: put {self.mask_token} "
                                 "where the word to predict goes.")
        return batch

    def postprocess(self, model_inputs, outputs, top_k: int = 5, target_ids=None):
        results = []
        for b, logits in enumerate(outputs["logits"]):  # logits: (T, V)
            keep = model_inputs.attention_mask[b].astype(bool)  # drops padding on either side
            ids, logits = model_inputs.input_ids[b][keep], logits[keep]
            masked = np.flatnonzero(ids == self.mask_id)  # (M,)
            probs = softmax(logits[masked].astype(np.float32))  # (M, V)
            if target_ids is not None:
                probs = probs[:, target_ids]  # (M, len(targets))
            rows = [self.predictions(ids, m, p, top_k, target_ids, single=len(masked) == 1)
                    for m, p in zip(masked, probs)]
            results.append(rows[0] if len(rows) == 1 else rows)
        return results

    def predictions(self, ids, position: int, probs, top_k: int, target_ids, single: bool) -> list[dict]:
        """The top_k candidates for the mask at ``position``, each with the input decoded with it filled in."""
        best = np.argsort(-probs, kind="stable")[:top_k]
        out = []
        for i in best:
            token = int(i if target_ids is None else target_ids[i])
            filled = ids.copy()
            filled[position] = token
            if self.tokenizer.pad_token is not None:  # pad tokens typed in the text are dropped too, as in transformers
                filled = filled[filled != self.tokenizer.pad_id]
            # With one mask, special tokens are skipped for a readable sentence; with several they stay, or the
            # other masks would vanish from it (transformers does the same).
            out.append({"score": float(probs[i]), "token": token,
                        "token_str": self.tokenizer.decode([token], skip_special_tokens=False),
                        "sequence": self.tokenizer.decode(filled, skip_special_tokens=single)})
        return out

    def _shape(self, inputs, single, results, **kwargs):
        return results[0] if single or len(results) == 1 else results
