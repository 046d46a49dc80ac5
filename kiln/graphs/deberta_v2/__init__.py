"""DeBERTa-v2 and DeBERTa-v3 (model_type "deberta-v2"): disentangled attention with relative positions."""

from __future__ import annotations

from kiln.graphs.deberta_v2 import weights
from kiln.graphs.deberta_v2.config import VARIANTS, DebertaV2Config
from kiln.graphs.registry import Architecture

ARCHITECTURE = Architecture(
    family="deberta_v2",
    config=DebertaV2Config,
    weights=weights,
    variants=VARIANTS,
    tasks={
        "feature-extraction": ("DebertaV2Model", "Model"),
        "text-classification": ("DebertaV2ForSequenceClassification", "ForSequenceClassification"),
        "token-classification": ("DebertaV2ForTokenClassification", "ForTokenClassification"),
        "question-answering": ("DebertaV2ForQuestionAnswering", "ForQuestionAnswering"),
        "fill-mask": ("DebertaV2ForMaskedLM", "ForMaskedLM"),
    },
    spec="text-encoder",
    description="text encoders with disentangled relative attention: rerankers, NLI and zero-shot classifiers, NER, QA",
)
