"""The tasks kiln exports and runs: the one list. Each task has a pipeline in ``kiln/runtime/pipelines/<task>.py``
(dashes as underscores) named ``<Task>Pipeline``, and families declare which of them they support
(``kiln.graphs.registry.Architecture.tasks``)."""

TASKS = ("feature-extraction", "text-classification", "token-classification", "question-answering", "fill-mask",
         "image-classification", "text-generation", "automatic-speech-recognition")
# Pipelines over the artifacts of another task: zero-shot classification runs any NLI text-classification artifact.
# pipeline task -> the tasks of the artifacts it runs, where they are not its own
ARTIFACT_TASKS = {"zero-shot-classification": ("text-classification",)}
PIPELINE_TASKS = TASKS + tuple(ARTIFACT_TASKS)
# transformers' TASK_ALIASES that name one of kiln's tasks
ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}
