"""Pipelines are preprocess -> forward -> postprocess; only ``forward`` touches the engine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from kiln.artifact import load_manifest
from kiln.artifact import verify as verify_artifact
from kiln.errors import ArtifactError, InputError
from kiln.runtime.engines import open_engine
from kiln.runtime.tokenizer import Tokenizer, check_texts


class Pipeline:
    task: str = ""

    def __init__(self, artifact: str | os.PathLike, *, device: str = "cpu", threads: int | None = None,
                 batch_size: int = 8, engine=None, verify: bool = False):
        self.path = Path(artifact)
        if verify:  # sha256 of every file against kiln.json, before anything is loaded
            verify_artifact(self.path)
        self.manifest = load_manifest(self.path)
        if self.manifest["task"] != self.task:
            raise ArtifactError(f"{self.path} was exported for {self.manifest['task']!r}, not {self.task!r}. "
                                f"Use pipeline({self.manifest['task']!r}, ...) or re-export with --task {self.task}.")
        self.config = _read_json(self.path / "config.json")
        self.engine = engine or open_engine(self.path / self.manifest["model"], device=device, threads=threads,
                                            manifest=self.manifest)
        self.input_names = [i.name for i in self.engine.inputs()]
        self.load_preprocessor()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
        # The engine refuses batches beyond the range the artifact was exported and validated for: stay inside it.
        exported = (self.manifest.get("dynamic_axes") or {}).get("batch")
        self.batch_size = min(batch_size, exported["max"]) if exported else batch_size

    def load_preprocessor(self) -> None:
        """Text pipelines tokenize; an image pipeline overrides this to load its image processor."""
        self.tokenizer = Tokenizer.from_dir(self.path, max_length=self.manifest.get("max_sequence_length"))

    def __call__(self, inputs, **kwargs):
        single, items = self._items(inputs)
        results = []
        for start in range(0, len(items), self.batch_size):
            model_inputs = self.preprocess(items[start:start + self.batch_size], **kwargs)
            outputs = self.forward(model_inputs)
            results.extend(self.postprocess(model_inputs, outputs, **kwargs))
        return self._shape(inputs, single, results, **kwargs)

    def batch(self, items: list, **kwargs) -> list:
        """One result per item, each shaped as ``self(item, **kwargs)`` returns it, from one call over all the items
        (tokenized and padded together): what ``kiln.runtime.Batcher`` needs of the callable it wraps."""
        if len(items) == 1:  # some pipelines unwrap a one-item list (fill-mask, question answering): ask for the item
            return [self(items[0], **kwargs)]
        results = self(list(items), **kwargs)
        # transformers shapes a lone input's result differently from one in a list (text-classification wraps a
        # lone string's result in a list): ``_shape`` knows how, per pipeline.
        return [self._shape(item, True, [result], **kwargs) for item, result in zip(items, results)]

    def _items(self, inputs) -> tuple[bool, list]:
        if isinstance(inputs, (list, tuple)) and inputs:
            return False, list(inputs)  # items are checked by preprocess (texts, or dicts for pairs)
        return True, check_texts(inputs)  # a str, or the clearest error for bytes, None, [] ...

    def _shape(self, inputs, single: bool, results: list, **kwargs):
        return results[0] if single else results

    def forward(self, model_inputs) -> dict[str, np.ndarray]:
        return self.engine.run(model_inputs.feed(self.input_names))

    def preprocess(self, items, **kwargs):
        raise NotImplementedError

    def postprocess(self, model_inputs, outputs, **kwargs) -> list:
        raise NotImplementedError


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing from the artifact. Re-export it.") from None
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, over-long numbers, hostile nesting
        raise ArtifactError(f"{path} is not valid JSON ({err}). Re-export the artifact.") from err
