"""Which checkpoints kiln can build: one ``Architecture`` record per model family, and one generic ``build()``.

A family is a folder ``kiln/graphs/<family>/`` with ``config.py`` (a frozen config dataclass and its ``VARIANTS``: the
model types it reads and how they differ), ``weights.py`` (the checkpoint key table), ``model_<framework>.py`` (the
references, the same class names in every framework) and, in its ``__init__.py``, the record ``ARCHITECTURE``. The
registry finds the families by looking for that record, so adding a family touches nothing outside its folder, and
adding a model type that an existing family can read is one entry in that family's ``VARIANTS``.

Light: the records import configs and key tables only; a framework is imported when a model is built.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from kiln.errors import ConfigError, InputError


@dataclass(frozen=True)
class Variant:
    """One ``model_type`` of a family: the prefix of transformers' class names for it (``Roberta`` ->
    ``RobertaModel``, ``RobertaForMaskedLM``) and the facts in which it differs from its siblings, read by the family's
    config and key table (e.g. ``{"layout": "roberta"}``)."""

    hf_prefix: str
    facts: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str):
        return self.facts[key]

    def get(self, key: str, default=None):
        return self.facts.get(key, default)


@dataclass(frozen=True)
class Architecture:
    """Everything kiln needs to build, load, save and export one model family."""

    family: str  # the package kiln.graphs.<family>
    config: type  # frozen dataclass with from_dict(raw) and validate()
    weights: ModuleType  # hf_to_kiln(state, config, task), kiln_to_hf(state, config, task)
    variants: Mapping[str, Variant]  # model_type (config.json) -> Variant
    tasks: Mapping[str, tuple[str, str]]  # task -> (kiln class in model_<framework>.py, transformers class suffix)
    spec: str  # the exporter's layout of inputs and outputs: text-encoder | vision-encoder | decoder
    frameworks: tuple[str, ...] = ("torch",)  # the model_<framework>.py files it has
    formats: tuple[str, ...] = ("safetensors", "pytorch")  # checkpoint files it reads; "gguf" is converted at resolve
    pooler: str | None = None  # a weight whose presence gives the feature-extraction model its pooler
    description: str = ""  # one line for the supported-models table

    def hf_class(self, model_type: str, task: str) -> str:
        """transformers' class for this model type and task (what ``save_pretrained`` writes as "architectures")."""
        return self.variants[model_type].hf_prefix + self.tasks[task][1]

    def check_task(self, model_type: str, task: str) -> None:
        if task not in self.tasks:
            raise ConfigError(f"Task {task!r} is not supported for model_type {model_type!r}. "
                              f"Supported tasks: {', '.join(self.tasks)}.")

    def check_framework(self, model_type: str, framework: str) -> None:
        """A clear error for a framework this family has no reference in, or one that is not installed."""
        import importlib.util

        if framework not in FRAMEWORKS:
            raise InputError(f"Unknown framework {framework!r}; choose {', '.join(FRAMEWORKS)}.")
        frameworks = self.variants[model_type].get("frameworks", self.frameworks) if model_type in self.variants \
            else self.frameworks  # a model type may have fewer references than its family (Phi-3: torch only)
        if framework not in frameworks:
            raise ConfigError(f"model_type {model_type!r} has a reference in {', '.join(frameworks)} only, "
                              f"not {framework}. Use --framework torch.")
        info = FRAMEWORKS[framework]
        if importlib.util.find_spec(info.module) is None:
            raise InputError(f"--framework {framework} needs {info.needs}: pip install 'kiln[{info.extra}]'.")


@dataclass(frozen=True)
class Framework:
    """A framework kiln has references in, and how its references become ONNX."""

    name: str
    title: str  # for progress lines
    module: str  # imported to tell whether it is installed
    extra: str  # pip install 'kiln[extra]'
    needs: str  # what that installs, in words
    packages: tuple[str, ...]  # distributions whose versions kiln.json records
    converter: str  # what traces it to ONNX


FRAMEWORKS = {f.name: f for f in (
    Framework("torch", "PyTorch", "torch", "torch", "torch", ("torch",), "torch.onnx (dynamo)"),
    Framework("jax", "JAX (flax nnx)", "flax", "jax", "jax, flax and jax2onnx", ("jax", "flax", "jax2onnx"),
              "jax2onnx"),
    Framework("tf", "TensorFlow (keras)", "tensorflow", "tf", "tensorflow, keras and tf2onnx",
              ("tensorflow", "tensorflow-cpu", "keras", "tf2onnx"), "tf2onnx"),
)}


@functools.lru_cache(maxsize=1)
def architectures() -> tuple[Architecture, ...]:
    """Every family's record: the packages under kiln.graphs whose ``__init__`` defines ``ARCHITECTURE``."""
    import kiln.graphs

    found = []
    for info in sorted(pkgutil.iter_modules(kiln.graphs.__path__), key=lambda m: m.name):
        if info.ispkg:
            record = getattr(importlib.import_module(f"kiln.graphs.{info.name}"), "ARCHITECTURE", None)
            if isinstance(record, Architecture):
                found.append(record)
    return tuple(found)


def model_types() -> dict[str, Architecture]:
    return {model_type: arch for arch in architectures() for model_type in arch.variants}


def architecture(config: dict) -> Architecture:
    """The record for a config.json dict, or a ConfigError that lists what kiln supports."""
    supported = model_types()
    model_type = config.get("model_type")
    if model_type is None:
        raise ConfigError("config.json has no 'model_type'; kiln needs it to pick the architecture "
                          f"(supported: {', '.join(sorted(supported))}).")
    if not isinstance(model_type, str) or model_type not in supported:
        raise ConfigError(f"model_type {model_type!r} is not supported by kiln yet. Supported model types: "
                          f"{', '.join(sorted(supported))}.")
    return supported[model_type]


def check_task(config: dict, task: str) -> None:
    architecture(config).check_task(config["model_type"], task)


def build(raw: dict, task: str, hf_state: dict, attn_impl: str = "sdpa", framework: str = "torch"):
    """The ``framework`` reference of ``raw``'s family for ``task``, with the checkpoint's weights loaded and checked
    (errors name tensors by their Hugging Face names)."""
    from kiln.graphs.checkpoint import attach_weights

    arch = architecture(raw)
    arch.check_task(raw["model_type"], task)
    arch.check_framework(raw["model_type"], framework)
    config = arch.config.from_dict(raw)
    if framework != "torch" and getattr(config, "pruned_heads", None):
        raise ConfigError("This checkpoint has pruned heads (config.json pruned_heads), which only the PyTorch "
                          "reference builds (each layer with its own head count). Use --framework torch.")
    state, unused = arch.weights.hf_to_kiln(hf_state, config, task)
    models = importlib.import_module(f"kiln.graphs.{arch.family}.model_{framework}")
    options = {"add_pooler": arch.pooler in state} if arch.pooler and task == "feature-extraction" else {}
    model = getattr(models, arch.tasks[task][0])(config, attn_impl=attn_impl, **options)
    return attach_weights(model, arch.weights, state, unused, task)
