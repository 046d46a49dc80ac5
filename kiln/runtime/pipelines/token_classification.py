"""token-classification (NER): entities as transformers.pipeline("token-classification") returns them.

Per token: softmax over labels, then one of transformers' aggregation strategies:
  none     one dict per token: entity, score, index, word (the raw token), start, end
  simple   adjacent tokens with the same tag merge (a B- tag starts a new group): entity_group, score (mean), word...
  first | average | max   tokens of one word first agree on one label (the first token's, the mean scores' or the
           most confident token's), then group as in simple. Word boundaries come from offsets (below).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from kiln.errors import InputError
from kiln.runtime.pipelines.base import Pipeline, given
from kiln.runtime.scores import softmax
from kiln.runtime.tokenizer import Batch

log = logging.getLogger("kiln")

STRATEGIES = ("none", "simple", "first", "average", "max")
WORD_STRATEGIES = ("first", "average", "max")
UNSUPPORTED = {  # transformers options kiln does not implement yet
    "stride": "long texts are truncated to the model's maximum instead (a warning says so)",
    "is_split_into_words": "join the words into one string",
    "offset_mapping": "kiln takes the offsets from the tokenizer",
}


@dataclass
class TextBatch(Batch):
    texts: list[str] | None = None


class TokenClassificationPipeline(Pipeline):
    """``pipe(text, aggregation_strategy="simple", ignore_labels=["O"])``: a list of entities for a string, a list of
    such lists for a list of strings."""

    task = "token-classification"

    def setup(self) -> None:
        self.id2label = {int(k): v for k, v in (self.config.get("id2label") or {}).items()}
        # WordPiece marks word continuations ("##"); byte-level BPE does not, so words come from spaces instead.
        self.word_aware = bool(self.tokenizer.continuing_subword_prefix)

    def _sanitize_parameters(self, truncation=None, aggregation_strategy=None, ignore_labels=None, stride=None,
                             is_split_into_words=None, offset_mapping=None):
        for name, value in (("stride", stride), ("is_split_into_words", is_split_into_words),
                            ("offset_mapping", offset_mapping)):
            if value not in (None, False):
                raise InputError(f"token-classification option {name!r} is not supported by kiln yet; "
                                 f"{UNSUPPORTED[name]}.")
        post = given(ignore_labels=ignore_labels)
        if aggregation_strategy is not None:
            strategy = str(getattr(aggregation_strategy, "value", aggregation_strategy)).lower()
            if strategy not in STRATEGIES:
                raise InputError(f"aggregation_strategy must be one of {STRATEGIES}, got {aggregation_strategy!r}.")
            post["aggregation_strategy"] = strategy
        return given(truncation=truncation), {}, post

    def _params(self, kwargs: dict) -> tuple[dict, dict, dict, int]:
        params = super()._params(kwargs)
        # Once per call (not per batch), for the strategy in force: given at construction or by this call.
        if params[2].get("aggregation_strategy") in WORD_STRATEGIES and not self.word_aware:
            log.warning("Tokenizer does not support real words, using fallback heuristic "
                        "(a word starts after a space).")
        return params

    def label(self, i: int) -> str:
        return self.id2label.get(int(i), f"LABEL_{int(i)}")

    def preprocess(self, items, truncation: bool = True):
        # Postprocess needs the texts themselves: words are cut from them by offsets.
        return TextBatch(**vars(self.tokenizer(items, truncation=truncation)), texts=list(items))

    def postprocess(self, model_inputs, outputs, aggregation_strategy: str = "none", ignore_labels=None):
        ignore = ["O"] if ignore_labels is None else ignore_labels
        scores = softmax(outputs["logits"].astype(np.float32))  # (B, T, num_labels)
        results = []
        for b, text in enumerate(model_inputs.texts):
            keep = model_inputs.attention_mask[b].astype(bool)  # drops padding on either side
            tokens = self.gather(text, model_inputs.input_ids[b][keep], scores[b][keep],
                                 model_inputs.offsets[b], model_inputs.special_tokens_mask[b][keep])
            entities = self.aggregate(tokens, aggregation_strategy)
            results.append([e for e in entities
                            if e.get("entity") not in ignore and e.get("entity_group") not in ignore])
        return results

    def gather(self, text: str, ids, scores, offsets, special) -> list[dict]:
        """One dict per non-special token: its word piece, label scores, character span and whether it continues
        the word before it."""
        unk = self.tokenizer.unk_token_id
        tokens = []
        for index, (id_, row, (start, end), is_special) in enumerate(zip(ids, scores, offsets, special)):
            if is_special:
                continue
            word, piece = self.tokenizer.id_to_token(id_), text[start:end]
            if self.word_aware:
                # "##is" covers "is": a token longer than its text carries the continuation prefix.
                is_subword = len(word) != len(piece)
            else:
                is_subword = start > 0 and " " not in text[start - 1:start + 1]
            if unk is not None and int(id_) == unk:  # show the text the model could not read, not "[UNK]"
                word, is_subword = piece, False
            tokens.append({"word": word, "scores": row, "start": int(start), "end": int(end), "index": index,
                           "is_subword": is_subword})
        return tokens

    def aggregate(self, tokens: list[dict], strategy: str) -> list[dict]:
        if strategy in WORD_STRATEGIES:
            entities = [self.aggregate_word(group, strategy) for group in _words(tokens)]
        else:
            entities = []
            for t in tokens:
                best = int(t["scores"].argmax())
                entities.append({"entity": self.label(best), "score": float(t["scores"][best]), "index": t["index"],
                                 "word": t["word"], "start": t["start"], "end": t["end"]})
        return entities if strategy == "none" else self.group_entities(entities)

    def aggregate_word(self, tokens: list[dict], strategy: str) -> dict:
        """One label for all the tokens of a word."""
        if strategy == "first":
            scores = tokens[0]["scores"]
        elif strategy == "max":
            scores = max(tokens, key=lambda t: t["scores"].max())["scores"]  # the first most confident token
        else:  # average
            scores = np.nanmean(np.stack([t["scores"] for t in tokens]), axis=0)
        best = int(scores.argmax())
        return {"entity": self.label(best), "score": float(scores[best]),
                "word": self.tokenizer.convert_tokens_to_string([t["word"] for t in tokens]),
                "start": tokens[0]["start"], "end": tokens[-1]["end"]}

    def group_entities(self, entities: list[dict]) -> list[dict]:
        """Merge neighbours with the same tag; B- starts a new group, I- (or no prefix) continues one."""
        groups: list[list[dict]] = []
        for entity in entities:
            bi, tag = _tag(entity["entity"])
            if groups and bi != "B" and tag == _tag(groups[-1][-1]["entity"])[1]:
                groups[-1].append(entity)
            else:
                groups.append([entity])
        return [self.group(g) for g in groups]

    def group(self, entities: list[dict]) -> dict:
        return {"entity_group": entities[0]["entity"].split("-", 1)[-1],
                "score": float(np.nanmean([e["score"] for e in entities])),
                "word": self.tokenizer.convert_tokens_to_string([e["word"] for e in entities]),
                "start": entities[0]["start"], "end": entities[-1]["end"]}


def _words(tokens: list[dict]) -> list[list[dict]]:
    """Split tokens into words: a token that is not a subword starts a new one."""
    words: list[list[dict]] = []
    for t in tokens:
        if words and t["is_subword"]:
            words[-1].append(t)
        else:
            words.append([t])
    return words


def _tag(label: str) -> tuple[str, str]:
    """("B"|"I", tag) of an IOB label; a label without a prefix counts as a continuation, as in transformers."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label
