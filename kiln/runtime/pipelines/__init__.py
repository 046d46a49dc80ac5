"""Task pipelines over artifacts. ``pipeline(task, artifact)``; without a task, the artifact's own (kiln.json)."""

from __future__ import annotations

import importlib

from kiln.artifact import load_manifest
from kiln.errors import InputError
from kiln.tasks import ALIASES as TASK_ALIASES
from kiln.tasks import PIPELINE_TASKS

# task -> "module:Class" (one file per task, named after it), imported on first use so that e.g. text pipelines never
# import Pillow.
PIPELINES = {task: task.replace("-", "_") + ":" + task.title().replace("-", "") + "Pipeline" for task in PIPELINE_TASKS}


def resolve_task(task: str) -> str:
    """The task a name (or one of transformers' aliases) stands for; an InputError for one kiln has no pipeline for."""
    task = TASK_ALIASES.get(task, task)
    if task not in PIPELINES:
        raise InputError(f"Unknown task {task!r}; kiln's pipelines: {', '.join(sorted(PIPELINES))} (aliases: "
                         f"{', '.join(f'{a} = {t}' for a, t in TASK_ALIASES.items())}).")
    return task


def pipeline_class(task: str):
    module, name = PIPELINES[resolve_task(task)].split(":")
    return getattr(importlib.import_module(f"kiln.runtime.pipelines.{module}"), name)


def pipeline(task: str | None, artifact, **kwargs):
    """``task`` None: the one the artifact was exported for."""
    if task is None:
        manifest = load_manifest(artifact)
        task = manifest["task"]
        # a vision encoder's feature-extraction artifact: its pipeline is the image one
        if task == "feature-extraction" and any(i.get("name") == "pixel_values" for i in manifest.get("inputs", [])):
            task = "image-feature-extraction"
    return pipeline_class(task)(artifact, **kwargs)


__all__ = ["PIPELINES", "TASK_ALIASES", "pipeline", "pipeline_class", "resolve_task"]
