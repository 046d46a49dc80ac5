"""Export a plain checkpoint once into a cache keyed by the source's hash, for ``kiln.pipeline(task, checkpoint)``."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from filelock import FileLock

from kiln import hub
from kiln.version import __version__
from kiln.artifact import is_artifact

log = logging.getLogger("kiln")


def cache_root() -> Path:
    return hub.cache_root() / "artifacts"


def cache_key(checkpoint: hub.Checkpoint, task: str, opset: int) -> str:
    digest = hashlib.sha256()
    config = (checkpoint.path / "config.json").read_bytes()
    for part in (hub.sha256_files(checkpoint.source_files), config.hex(), task, str(opset), __version__):
        digest.update(str(part).encode() + b"\0")
    return digest.hexdigest()[:24]


def cached_export(model, task: str, revision: str | None = None, opset: int | None = None) -> Path:
    from kiln.exporter import DEFAULT_OPSET, export

    opset = opset or DEFAULT_OPSET
    checkpoint = hub.resolve(model, revision)
    hub.read_config(checkpoint)  # a clear error before hashing
    target = cache_root() / cache_key(checkpoint, task, opset)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two processes asking for the same checkpoint export it once; the second waits and reuses the result.
    with FileLock(str(target) + ".lock"):
        if not is_artifact(target):
            log.info("Exporting %s for %s into the cache at %s", model, task, target)
            export(str(checkpoint.origin[0] if checkpoint.origin else checkpoint.path), target, task=task, opset=opset)
    return target
