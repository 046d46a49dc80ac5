"""zero-shot-classification: any natural-language-inference classifier (a text-classification artifact whose labels
include an "entailment" one) scores candidate labels it was never trained on, as transformers'
``pipeline("zero-shot-classification")`` does: each label becomes a hypothesis ("This example is {}.") paired with the
sequence, and the entailment logits rank the labels."""

from __future__ import annotations

import numpy as np

from kiln.errors import ArtifactError, InputError
from kiln.runtime.pipelines.base import Pipeline, given
from kiln.runtime.scores import softmax

DEFAULT_TEMPLATE = "This example is {}."


def parse_labels(labels) -> list[str]:
    """A list of labels, or one string of comma-separated labels (as transformers takes them)."""
    if isinstance(labels, str):
        labels = [label.strip() for label in labels.split(",") if label.strip()]
    if not isinstance(labels, (list, tuple)) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise InputError("candidate_labels must be one or more non-empty strings (a list, or one string of "
                         f"comma-separated labels), got {labels!r:.100}.")
    return list(labels)


def check_template(template, example: str = DEFAULT_TEMPLATE) -> str:
    if not isinstance(template, str) or template.format("x") == template:
        raise InputError(f"hypothesis_template {template!r:.100} has no place for the label: it must contain {{}}, "
                         f"e.g. {example!r}.")
    return template


class CandidateLabels:
    """Mixed into the zero-shot pipelines: ``candidate_labels`` may also be the second positional argument, as in
    transformers."""

    def __call__(self, inputs, *args, **kwargs):
        if len(args) > 1 or (args and "candidate_labels" in kwargs):
            raise InputError("Give candidate_labels once: as the second argument or as candidate_labels=.")
        if args:
            kwargs["candidate_labels"] = args[0]
        return super().__call__(inputs, **kwargs)


class ZeroShotClassificationPipeline(CandidateLabels, Pipeline):
    """Inputs: a string or a list of strings, with ``candidate_labels`` (also the second positional argument).
    Returns ``{"sequence", "labels", "scores"}`` per string, labels sorted by score. ``multi_label=True`` scores each
    label on its own (entailment against contradiction) instead of one softmax over the labels."""

    task = "zero-shot-classification"

    def setup(self) -> None:
        labels = {int(k): str(v) for k, v in (self.config.get("id2label") or {}).items()}
        found = [i for i, label in sorted(labels.items()) if label.lower().startswith("entail")]
        if not found:
            raise ArtifactError(f"{self.path} is not a natural-language-inference classifier: none of its labels "
                                f"({', '.join(labels.values()) or 'none'}) is 'entailment', which zero-shot "
                                "classification scores. Use an NLI checkpoint (e.g. one fine-tuned on MNLI), or name "
                                "the entailment label in config.json's id2label.")
        self.entailment_id = found[0]
        # The other side of multi-label scoring: transformers takes label 0, or the last when entailment is 0.
        self.contradiction_id = len(labels) - 1 if self.entailment_id == 0 else 0

    def _sanitize_parameters(self, candidate_labels=None, hypothesis_template=None, multi_label=None,
                             truncation=None):
        pre = given(truncation=truncation)
        if candidate_labels is not None:
            pre["candidate_labels"] = parse_labels(candidate_labels)
        if hypothesis_template is not None:
            pre["hypothesis_template"] = check_template(hypothesis_template)
        return pre, {}, given(multi_label=multi_label)

    def preprocess(self, items, candidate_labels=None, hypothesis_template: str = DEFAULT_TEMPLATE,
                   truncation: bool = True):
        if candidate_labels is None:
            raise InputError("zero-shot-classification needs candidate_labels, e.g. "
                             "classifier(text, candidate_labels=['sports', 'politics']).")
        hypotheses = [hypothesis_template.format(label) for label in candidate_labels]
        texts = [text for text in items for _ in hypotheses]
        # The sequence is cut to fit, never the hypothesis (transformers' truncation="only_first").
        batch = self.tokenizer(texts, hypotheses * len(items), truncation=truncation, strategy="only_first")
        return batch, items, candidate_labels

    def forward(self, model_inputs, batch_size: int, head_mask=None) -> dict[str, np.ndarray]:
        # Each sequence makes one row per label: run them batch_size rows at a time.
        batch, _, _ = model_inputs
        feed, rows = batch.feed(self.input_names), len(batch.input_ids)
        extra = {} if head_mask is None else {"head_mask": head_mask}
        logits = [self.engine.run({**{k: v[i:i + batch_size] for k, v in feed.items()}, **extra})["logits"]
                  for i in range(0, rows, batch_size)]
        return {"logits": np.concatenate(logits)}

    def postprocess(self, model_inputs, outputs, multi_label: bool = False) -> list[dict]:
        _, items, labels = model_inputs
        logits = outputs["logits"].astype(np.float32).reshape(len(items), len(labels), -1)  # (N, labels, classes)
        if multi_label or len(labels) == 1:
            pair = logits[..., [self.contradiction_id, self.entailment_id]]
            scores = softmax(pair)[..., 1]  # each label: entailment against contradiction
        else:
            scores = softmax(logits[..., self.entailment_id])  # one distribution over the labels
        results = []
        for text, row in zip(items, scores):
            order = list(reversed(row.argsort(kind="stable")))
            results.append({"sequence": text, "labels": [labels[i] for i in order],
                            "scores": [float(row[i]) for i in order]})
        return results
