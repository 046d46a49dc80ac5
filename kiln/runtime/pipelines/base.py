"""Pipelines are preprocess -> forward -> postprocess; only ``forward`` touches the engine.

Options follow transformers' contract: each pipeline declares its options as the keyword arguments of
``_sanitize_parameters``, which routes them to preprocess, forward or postprocess. They may be given when the
pipeline is made (``pipeline(task, model, top_k=3)``) or called, the call's values winning; a keyword that no step
takes is an InputError that lists the valid ones. A list of inputs gives a list of results; an iterator (a generator)
gives an iterator of results, computed ``batch_size`` inputs at a time as they are asked for.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kiln.artifact import load_manifest
from kiln.artifact import verify as verify_artifact
from kiln.errors import ArtifactError, InputError
from kiln.files import read_json
from kiln.runtime.engines import open_engine
from kiln.runtime.engines.base import check_head_mask
from kiln.runtime.tokenizer import Tokenizer, check_texts
from kiln.tasks import ARTIFACT_TASKS


class Pipeline:
    task: str = ""

    def __init__(self, artifact: str | os.PathLike, *, device: str = "cpu", threads: int | None = None,
                 batch_size: int = 8, engine=None, verify: bool = False, **options):
        """``options``: the call options of this task, used by every call that does not give its own."""
        self.path = Path(artifact)
        self._open = {"device": device, "threads": threads}  # an artifact's further graphs open as its main one
        if verify:  # sha256 of every file against kiln.json, before anything is loaded
            verify_artifact(self.path)
        self.manifest = load_manifest(self.path)
        wanted = ARTIFACT_TASKS.get(self.task, (self.task,))  # zero-shot classification runs an NLI classifier
        if self.manifest["task"] not in wanted:
            raise ArtifactError(f"{self.path} was exported for {self.manifest['task']!r}; {self.task} runs "
                                f"{' or '.join(map(repr, wanted))} artifacts. Use pipeline({self.manifest['task']!r}, "
                                f"...) or re-export with --task {wanted[0]}.")
        path = self.path / "config.json"
        self.config = read_json(path, "Re-export the artifact.", missing=f"{path} is missing from the artifact. "
                                "Re-export it.")
        self.engine = engine or open_engine(self.path / self.manifest["model"], device=device, threads=threads,
                                            manifest=self.manifest)
        self.input_names = [i.name for i in self.engine.inputs()]
        self.load_preprocessor()
        self.batch_size = self._batch_size(batch_size)
        self.setup()
        self._defaults = self._route(options)

    def load_preprocessor(self) -> None:
        """Text pipelines tokenize; an image pipeline overrides this to load its image processor."""
        self.tokenizer = Tokenizer.from_dir(self.path, max_length=self.manifest.get("max_sequence_length"))

    def setup(self) -> None:
        """What a task reads from the artifact beyond the engine and the preprocessor (labels, a decoder session);
        runs before the construction options are checked, so that their checks may use it."""

    # ------------------------------------------------------------------------------------------------- options

    def _sanitize_parameters(self) -> tuple[dict, dict, dict]:
        """(preprocess, forward, postprocess) keyword arguments from the given options; an option that is not given
        (None, or its own sentinel) stays out, so that it does not override one given at construction."""
        return {}, {}, {}

    @classmethod
    @functools.cache
    def option_names(cls) -> tuple[str, ...]:
        """The options this task takes, at construction or call: the keywords of ``_sanitize_parameters``."""
        parameters = inspect.signature(cls._sanitize_parameters).parameters.values()
        return tuple(sorted(p.name for p in parameters if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                            p.KEYWORD_ONLY)))

    def _route(self, options: dict) -> tuple[dict, dict, dict]:
        options = dict(options)
        head_mask = options.pop("head_mask", None)
        unknown = sorted(set(options) - set(self.option_names()))
        if unknown:
            raise InputError(f"Unknown {self.task} option(s) {unknown}; the options are "
                             f"{', '.join(self.option_names()) or 'none'}, batch_size and head_mask.")
        pre, forward, post = self._sanitize_parameters(**options)
        if head_mask is not None:
            forward = {**forward, "head_mask": self._head_mask(head_mask)}
        return pre, forward, post

    def _head_mask(self, head_mask) -> np.ndarray:
        """transformers' head_mask, (heads,) for every layer or (layers, heads), 1 keeps a head and 0 masks it: fed
        to an artifact exported with ``--head-mask``."""
        info = next((i for i in self.engine.optional_inputs() if i.name == "head_mask"), None)
        if info is None:
            raise InputError(f"{self.path} takes no head_mask: export it with `kiln export ... --head-mask` to switch "
                             "heads off per call.")
        layers, heads = info.shape
        try:
            mask = np.asarray(head_mask, dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError(f"head_mask must be numbers, shape ({heads},) or ({layers}, {heads}).") from None
        if mask.shape == (heads,):
            mask = np.broadcast_to(mask, (layers, heads))
        if mask.shape != (layers, heads):
            raise InputError(f"head_mask must have shape ({heads},) or ({layers}, {heads}) (layers, heads), got "
                             f"{mask.shape}.")
        check_head_mask(mask)
        return np.ascontiguousarray(mask)

    def _params(self, kwargs: dict) -> tuple[dict, dict, dict, int]:
        """The call's options merged over the construction's, per step, and the batch size of this call."""
        kwargs = dict(kwargs)
        batch_size = kwargs.pop("batch_size", None)
        pre, forward, post = ({**made, **called} for made, called in zip(self._defaults, self._route(kwargs)))
        return pre, forward, post, self.batch_size if batch_size is None else self._batch_size(batch_size)

    def _batch_size(self, batch_size) -> int:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
        # The engine refuses batches beyond the range the artifact was exported and validated for: stay inside it.
        exported = (self.manifest.get("dynamic_axes") or {}).get("batch")
        return min(batch_size, exported["max"]) if exported else batch_size

    # ------------------------------------------------------------------------------------------------- calls

    def __call__(self, inputs, **kwargs):
        params = self._params(kwargs)
        if isinstance(inputs, Iterator):
            return self._iterate(inputs, *params)
        return self._call(inputs, params, kwargs)

    def _call(self, inputs, params: tuple, kwargs: dict):
        single, items = self._items(inputs)
        return self._shape(inputs, single, self._run(items, *params), **kwargs)

    def _run(self, items: list, pre: dict, forward: dict, post: dict, batch_size: int) -> list:
        """One result per item, ``batch_size`` items per engine batch."""
        results = []
        for start in range(0, len(items), batch_size):
            model_inputs = self.preprocess(items[start:start + batch_size], **pre)
            outputs = self.forward(model_inputs, batch_size=batch_size, **forward)
            results.extend(self.postprocess(model_inputs, outputs, **post))
        return results

    def _iterate(self, inputs: Iterator, pre: dict, forward: dict, post: dict, batch_size: int) -> Iterator:
        """Results of an iterator's items in order, as transformers' PipelineIterator gives them: the next
        ``batch_size`` items are taken only when the results before them have all been asked for."""
        while chunk := list(itertools.islice(inputs, batch_size)):
            yield from self._run([self._one(item) for item in chunk], pre, forward, post, batch_size)

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

    def _one(self, item):
        """One item of an iterator input, checked as a lone input is."""
        single, items = self._items(item)
        if not single:
            raise InputError(f"Each item of an iterator input is one input to {self.task}; got a "
                             f"{type(item).__name__} of {len(items)}. Pass a list to run several at once.")
        return items[0]

    def _shape(self, inputs, single: bool, results: list, **kwargs):
        return results[0] if single else results

    # ------------------------------------------------------------------------------------------------- steps

    def preprocess(self, items, **params):
        raise NotImplementedError

    def forward(self, model_inputs, batch_size: int, head_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``batch_size``: the call's, for a pipeline whose items make several engine rows (question answering)."""
        feed = model_inputs.feed(self.input_names)
        return self.engine.run(feed if head_mask is None else {**feed, "head_mask": head_mask})

    def postprocess(self, model_inputs, outputs, **params) -> list:
        raise NotImplementedError


def check_int(name: str, value, least: int = 1, *, what: str | None = None) -> None:
    """An InputError unless ``value`` is an int >= ``least``; a bool is refused too, though Python counts it an int
    (``top_k=True`` is a mistake, not 1). ``what`` names the values allowed in the message (default: "an integer >=
    least")."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InputError(f"{name} must be {what or f'an integer >= {least}'}, got {value!r}.")


def given(**options) -> dict:
    """The options whose value is not None: None means "not given" (transformers' convention), so that it does not
    override a value given at construction."""
    return {name: value for name, value in options.items() if value is not None}
