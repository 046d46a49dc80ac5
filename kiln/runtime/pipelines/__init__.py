"""Task pipelines over artifacts. ``pipeline(task, artifact_dir)``."""

from __future__ import annotations

from kiln.errors import InputError
from kiln.runtime.pipelines.feature_extraction import FeatureExtractionPipeline
from kiln.runtime.pipelines.text_classification import TextClassificationPipeline

PIPELINES = {p.task: p for p in (FeatureExtractionPipeline, TextClassificationPipeline)}


def pipeline(task: str, artifact, **kwargs):
    if task not in PIPELINES:
        raise InputError(f"Unknown task {task!r}; kiln's pipelines: {', '.join(sorted(PIPELINES))}.")
    return PIPELINES[task](artifact, **kwargs)


__all__ = ["PIPELINES", "pipeline", "FeatureExtractionPipeline", "TextClassificationPipeline"]
