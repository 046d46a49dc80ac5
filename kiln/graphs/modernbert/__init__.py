"""ModernBERT family: answerdotai/ModernBERT-base and -large and the checkpoints fine-tuned from them."""

from __future__ import annotations

from kiln.graphs.modernbert import weights
from kiln.graphs.modernbert.config import VARIANTS, ModernBertConfig
from kiln.graphs.registry import Architecture

ARCHITECTURE = Architecture(
    family="modernbert",
    config=ModernBertConfig,
    weights=weights,
    variants=VARIANTS,
    tasks={
        "feature-extraction": ("ModernBertModel", "Model"),
        "fill-mask": ("ModernBertForMaskedLM", "ForMaskedLM"),
        "text-classification": ("ModernBertForSequenceClassification", "ForSequenceClassification"),
        "token-classification": ("ModernBertForTokenClassification", "ForTokenClassification"),
        "question-answering": ("ModernBertForQuestionAnswering", "ForQuestionAnswering"),
    },
    spec="text-encoder",
    frameworks=("torch",),
    description="long-context text encoders (RoPE, local and global attention): embeddings, classifiers, NER, "
                "extractive QA, masked LM",
)
