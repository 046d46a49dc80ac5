"""The tasks kiln exports and runs: the one list. Each task has a pipeline in ``kiln/runtime/pipelines/<task>.py``
(dashes as underscores) named ``<Task>Pipeline``, and families declare which of them they support
(``kiln.graphs.registry.Architecture.tasks``)."""

TASKS = ("feature-extraction", "text-classification", "token-classification", "question-answering", "fill-mask",
         "image-classification", "text-generation", "automatic-speech-recognition", "zero-shot-image-classification")
# Pipelines over the artifacts of another task (zero-shot classification runs any NLI text-classification artifact):
# pipeline task -> the tasks of the artifacts it runs, its own first where it has artifacts of its own.
ARTIFACT_TASKS = {"zero-shot-classification": ("text-classification",),
                  # an image + text artifact's text tower embeds text too
                  "feature-extraction": ("feature-extraction", "zero-shot-image-classification"),
                  # an image encoder's (ViT, DINOv2) feature-extraction artifact, or CLIP's/SigLIP's vision tower
                  "image-feature-extraction": ("feature-extraction", "zero-shot-image-classification")}
PIPELINE_TASKS = TASKS + tuple(task for task in ARTIFACT_TASKS if task not in TASKS)
# transformers' TASK_ALIASES that name one of kiln's tasks
ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}
