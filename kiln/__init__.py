"""kiln: Hugging Face style checkpoints -> fused-attention ONNX artifacts -> a light runtime.

The public API. ``import kiln`` stays light: the exporter (torch, onnx) is imported only when you export.
"""

from __future__ import annotations

from kiln.errors import KilnError
from kiln.tasks import TASKS
from kiln.version import __version__


def from_pretrained(path_or_id, task: str = "feature-extraction", revision: str | None = None, attn_impl: str = "sdpa",
                    framework: str = "torch"):
    """The reference model for ``task`` in ``framework``: torch (needs ``kiln[torch]``), jax (``kiln[jax]``, flax nnx)
    or tf (``kiln[tf]``, keras 3); BERT and LLaMA families have all three."""
    from kiln.graphs.checkpoint import from_pretrained as _from_pretrained

    return _from_pretrained(path_or_id, task=task, revision=revision, attn_impl=attn_impl, framework=framework)


def export(model, output, task: str = "feature-extraction", **options):
    """Export a checkpoint (directory or hub id) to an artifact directory; returns the manifest. See ``kiln export -h``."""
    from kiln.errors import require

    if options.get("framework", "torch") == "torch":
        require("torch", "torch", "Exporting")
    require("onnx", "torch", "Exporting")
    from kiln.exporter import export as _export

    return _export(model, output, task=task, **options)


def prune(model, output, keep: float = 0.75, task: str = "feature-extraction", **options) -> dict:
    """Prune ``model``'s least important attention heads to ``keep`` of them and export it to ``output``; returns
    kiln.json, whose ``pruning`` entry reports the heads kept, the accuracy against the unpruned model and the
    speed-up. See ``kiln prune -h`` and ``kiln.exporter.prune``."""
    from kiln.errors import require

    require("torch", "torch", "Pruning")
    from kiln.exporter.prune import prune as _prune

    return _prune(model, output, keep=keep, task=task, **options)


def build(artifact, precision: str = "fp32", profile=None, timing_cache=None, version_compatible: bool = False, *,
          force: bool = False) -> dict:
    """Build (or reuse) a TensorRT engine for an artifact on this GPU; returns its kiln.json entry. Needs
    ``kiln[tensorrt]`` and TensorRT from NVIDIA. See ``kiln build -h``."""
    from kiln.exporter.tensorrt import build as _build

    return _build(artifact, precision=precision, profile=profile, timing_cache=timing_cache,
                  version_compatible=version_compatible, force=force)


def bench(artifact, batches=(1, 8), seqs=(16, 128, 512), **options) -> dict:
    """Latency of an artifact on this machine (medians, p90/p99, throughput, peak memory), optionally against its
    PyTorch reference (``compare=("torch",)``). See ``kiln bench -h`` and ``kiln.benchmark``."""
    from kiln.benchmark import bench as _bench

    return _bench(artifact, batches, seqs, **options)


def pipeline(task: str | None = None, model=None, *, revision: str | None = None, device: str = "cpu",
             threads: int | None = None, **kwargs):
    """A task pipeline over an artifact directory, an artifact on the hub ("org/name", downloaded and verified file
    by file; see ``kiln push``), or a plain checkpoint (exported once into a cache).

    As ``transformers.pipeline``: ``task`` may be one of transformers' aliases ("sentiment-analysis", "ner") or left
    out for an artifact, whose kiln.json names it; ``kwargs`` are the pipeline's options (``batch_size``, ``engine``,
    ``verify``) and any call option of the task (``top_k=3``), used by every call that does not give its own."""
    from pathlib import Path

    from kiln.artifact import MODEL_FILE, is_artifact, load_manifest
    from kiln.errors import InputError
    from kiln.runtime.pipelines import pipeline as _pipeline
    from kiln.runtime.pipelines import resolve_task

    if model is None:
        raise InputError("kiln.pipeline needs a model: an artifact directory, a checkpoint directory or a hub id, "
                         "e.g. kiln.pipeline('text-classification', 'path/to/model') or kiln.pipeline(model=...).")
    task = None if task is None else resolve_task(task)
    if (Path(model) / MODEL_FILE).is_file():
        load_manifest(model)  # an artifact that lost its kiln.json: say so rather than treat it as a checkpoint
    from kiln.share import is_repo_id, pull_artifact

    if is_repo_id(model):  # an artifact pushed to the hub, or a checkpoint there
        model = pull_artifact(model, revision) or model
    if not is_artifact(model):
        if task is None:
            raise InputError(f"{model} is a checkpoint, not a kiln artifact, so kiln cannot tell its task: pass it, "
                             f"e.g. kiln.pipeline('text-classification', {str(model)!r}) (tasks: {', '.join(TASKS)}).")
        from kiln.exporter.cache import cached_export

        from kiln.tasks import ARTIFACT_TASKS

        model = cached_export(model, task=ARTIFACT_TASKS.get(task, (task,))[0], revision=revision)
    return _pipeline(task, model, device=device, threads=threads, **kwargs)


def push_to_hub(artifact, repo_id: str, *, private: bool = False, revision: str | None = None, token: str | None = None,
                include_engines: bool = False) -> str:
    """Upload an artifact (verified first) with a generated model card to ``repo_id``; returns the commit URL. Pull it
    with ``kiln.pipeline(task, repo_id)``. See ``kiln push -h`` and ``kiln.share``."""
    from kiln.share import push_artifact

    return push_artifact(artifact, repo_id, private=private, revision=revision, token=token,
                         include_engines=include_engines)


__all__ = ["KilnError", "TASKS", "bench", "build", "export", "from_pretrained", "pipeline", "prune", "push_to_hub",
           "__version__"]
