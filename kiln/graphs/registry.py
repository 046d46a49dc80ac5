"""model_type -> architecture package. The single place that knows which checkpoints kiln can build."""

from __future__ import annotations

import importlib

from kiln.errors import ConfigError

# model_type (as in config.json) -> kiln.graphs.<package>
ARCHITECTURES: dict[str, str] = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "distilbert": "bert",
    "vit": "vit",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gpt2": "gpt2",
}

def package_for(config: dict) -> str:
    model_type = config.get("model_type")
    if model_type is None:
        raise ConfigError("config.json has no 'model_type'; kiln needs it to pick the architecture "
                          f"(supported: {', '.join(sorted(ARCHITECTURES))}).")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise ConfigError(f"model_type {model_type!r} is not supported by kiln yet. Supported model types: "
                          f"{', '.join(sorted(ARCHITECTURES))}.")
    return ARCHITECTURES[model_type]


def architecture(config: dict):
    """The ``kiln.graphs.<arch>`` module for a config dict."""
    return importlib.import_module(f"kiln.graphs.{package_for(config)}")


def check_task(config: dict, task: str) -> None:
    tasks = architecture(config).TASKS
    if task not in tasks:
        raise ConfigError(f"Task {task!r} is not supported for model_type {config['model_type']!r}. "
                          f"Supported tasks: {', '.join(tasks)}.")
