"""The runtime: engines + tokenizers + task pipelines. numpy, onnxruntime, tokenizers only: no torch, no transformers.

Thread safety: a pipeline object may be called from many threads at once, and each call returns what it would return
alone. The engine is shared (onnxruntime's ``run`` is thread-safe; the TensorRT engine serializes calls under a lock),
the tokenizer is configured at load and never mutated (differently truncating copies are made on first use and
kept), each call keeps its own state, and text generation binds its KV cache through one IO binding per thread.
``Batcher`` gathers concurrent single requests into shared calls (opt-in).
"""

from kiln.runtime.batcher import Batcher
from kiln.runtime.engines import Engine, open_engine
from kiln.runtime.pipelines import pipeline

__all__ = ["Batcher", "Engine", "open_engine", "pipeline"]
