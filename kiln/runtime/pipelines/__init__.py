"""Task pipelines over artifacts. ``pipeline(task, artifact_dir)``."""

from __future__ import annotations

import importlib

from kiln.errors import InputError

# task -> "module:Class", imported on first use so that e.g. text pipelines never import Pillow.
PIPELINES = {
    "feature-extraction": "feature_extraction:FeatureExtractionPipeline",
    "text-classification": "text_classification:TextClassificationPipeline",
    "token-classification": "token_classification:TokenClassificationPipeline",
    "question-answering": "question_answering:QuestionAnsweringPipeline",
    "fill-mask": "fill_mask:FillMaskPipeline",
    "image-classification": "image_classification:ImageClassificationPipeline",
    "text-generation": "text_generation:TextGenerationPipeline",
}


def pipeline_class(task: str):
    if task not in PIPELINES:
        raise InputError(f"Unknown task {task!r}; kiln's pipelines: {', '.join(sorted(PIPELINES))}.")
    module, name = PIPELINES[task].split(":")
    return getattr(importlib.import_module(f"kiln.runtime.pipelines.{module}"), name)


def pipeline(task: str, artifact, **kwargs):
    return pipeline_class(task)(artifact, **kwargs)


__all__ = ["PIPELINES", "pipeline", "pipeline_class"]
