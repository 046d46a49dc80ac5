"""Reading the JSON files of checkpoints and artifacts, and hashing files: one hardened copy of each for all of kiln.

Light: the standard library only, so the runtime, the hub resolution and the exporter all use it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from kiln.errors import ArtifactError

CHUNK = 1 << 20


def read_json(path: str | os.PathLike, fix: str, *, error: type[Exception] = ArtifactError, missing: str | None = None,
              obj: bool = True):
    """The JSON value in ``path``, or ``error`` with a message that names the file and ends with ``fix`` (what the
    user should do: "Re-export the artifact.", "Restore it from the checkpoint."). ``missing`` replaces the message
    for a file that does not exist; ``obj`` requires a JSON object. Bad UTF-8 or JSON, a 5000-digit number and
    nesting 100k levels deep (RecursionError) all fail with the same kind of message, never a traceback."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(missing or f"{path} is missing. {fix}") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{path} is not valid JSON ({err}). {fix}") from err
    except OSError as err:
        raise error(f"{path} could not be read ({err}). {fix}") from err
    if obj and not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object, found {type(value).__name__}. {fix}")
    return value


def _feed(digest, path: str | os.PathLike):
    """``digest`` updated with the file's bytes, read in chunks."""
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of one file's bytes."""
    return _feed(hashlib.sha256(), path).hexdigest()


def sha256_files(paths) -> str:
    """One sha256 over the given files in order (name + content), so that shards and renames both count. Remembered
    per (path, size, modification time) within a process: resolving, caching and exporting one checkpoint each need
    the hash of weights that may be gigabytes."""
    stats = []
    for path in paths:
        path = Path(path).resolve()
        stat = path.stat()
        stats.append((str(path), stat.st_size, stat.st_mtime_ns))
    return _sha256_files(tuple(stats))


@functools.lru_cache(maxsize=64)
def _sha256_files(stats: tuple) -> str:
    digest = hashlib.sha256()
    for path, _, _ in stats:
        digest.update(Path(path).name.encode() + b"\0")
        _feed(digest, path)
    return digest.hexdigest()
