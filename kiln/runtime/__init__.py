"""The runtime: engines + tokenizers + task pipelines. numpy, onnxruntime, tokenizers only: no torch, no transformers.

Thread safety: a pipeline object may be called from many threads at once. The onnxruntime session is shared (its
``run`` is thread-safe) and the tokenizer is configured once at load and never mutated afterwards.
"""

from kiln.runtime.engines import Engine, open_engine
from kiln.runtime.pipelines import pipeline

__all__ = ["Engine", "open_engine", "pipeline"]
