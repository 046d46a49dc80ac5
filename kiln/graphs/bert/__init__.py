"""BERT family: BERT, RoBERTa, XLM-RoBERTa, DistilBERT and the MiniLM checkpoints."""

from __future__ import annotations

from kiln.graphs.bert import weights
from kiln.graphs.bert.config import VARIANTS, BertConfig
from kiln.graphs.registry import Architecture

ARCHITECTURE = Architecture(
    family="bert",
    config=BertConfig,
    weights=weights,
    variants=VARIANTS,
    tasks={
        "feature-extraction": ("BertModel", "Model"),
        "text-classification": ("BertForSequenceClassification", "ForSequenceClassification"),
        "token-classification": ("BertForTokenClassification", "ForTokenClassification"),
        "question-answering": ("BertForQuestionAnswering", "ForQuestionAnswering"),
        "fill-mask": ("BertForMaskedLM", "ForMaskedLM"),
    },
    spec="text-encoder",
    frameworks=("torch", "jax", "tf"),
    pooler="pooler.weight",
    description="text encoders: sentence embeddings, classifiers, NER, extractive QA, masked LM",
)
