"""The artifact format: a directory with ``kiln.json`` (the manifest), ``model.onnx``, the config and tokenizer files.

The exporter writes it through :func:`atomic_directory` (temp dir, then rename) so a reader never sees half an
artifact; the runtime reads it with :func:`load_manifest`. No heavy imports here.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from kiln.errors import ArtifactError
from kiln.files import read_json, sha256_file

MANIFEST = "kiln.json"
FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"


def weights_file(graph: str | os.PathLike) -> Path:
    """Where an ONNX graph keeps its weights when they are not inside it (protobuf's 2 GB limit): ``<name>.data``
    beside it, ``model.onnx.data`` in an artifact."""
    graph = Path(graph)
    return graph.with_name(graph.name + ".data")


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_manifest(directory: str | os.PathLike) -> dict:
    """Read and check ``kiln.json``; every problem names the file and what to do."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{directory} is not a kiln artifact (no {MANIFEST}). Create one with `kiln export MODEL {directory}`."
        )
    manifest = read_json(path, "Re-export the artifact.")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {version!r}; this kiln reads version {FORMAT_VERSION}. "
            "Re-export the artifact with this kiln, or install the kiln version that wrote it."
        )
    for key in ("task", "model", "inputs", "outputs"):
        if key not in manifest:
            raise ArtifactError(f"{path} lacks the '{key}' entry. Re-export the artifact.")
    _check_types(path, manifest)
    model = artifact_file(directory, manifest["model"])
    if not model.is_file():
        raise ArtifactError(f"{directory} names {manifest['model']} in {MANIFEST} but the file is missing. Re-export it.")
    return manifest


def _check_types(path: Path, manifest: dict) -> None:
    """The entries the runtime reads, checked once here so that a damaged or hostile manifest fails with its name
    rather than with a TypeError deep in a pipeline."""

    def need(ok: bool, key: str, what: str):
        if not ok:
            raise ArtifactError(f"{path} has a malformed '{key}' entry ({what} expected, found "
                                f"{manifest.get(key)!r:.200}). Re-export the artifact.")

    def count(value, least: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    need(isinstance(manifest["task"], str), "task", "a task name")
    need(isinstance(manifest["model"], str) and manifest["model"] != "", "model", "a file name")
    for key in ("inputs", "outputs"):
        need(isinstance(manifest[key], list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                                     for t in manifest[key]), key, "a list of {name, dtype, shape}")
    axes = manifest.get("dynamic_axes", {})
    need(isinstance(axes, dict) and all(
        isinstance(r, dict) and count(r.get("min"), 0) and count(r.get("max"), 0) and r["min"] <= r["max"]
        for r in axes.values()), "dynamic_axes", "axis name -> {min, max} with 0 <= min <= max")
    need(manifest.get("max_sequence_length") is None or count(manifest["max_sequence_length"], 1),
         "max_sequence_length", "a positive integer or null")
    files = manifest.get("files", {})
    need(files is None or isinstance(files, dict) and all(isinstance(v, str) for v in files.values()), "files",
         "file name -> sha256")
    need(isinstance(manifest.get("engines", []), list), "engines", "a list")


def artifact_file(directory: str | os.PathLike, name: str) -> Path:
    """A file named by the manifest, refusing names that escape the artifact directory."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ArtifactError(f"{MANIFEST} in {directory} names {name!r:.200} as a file, which is not a valid file name. "
                            "Re-export the artifact.")
    # Judged on the name, not on where a symlink points: a hub download is a snapshot of links into a blob store.
    relative = os.path.normpath(name)
    if os.path.isabs(name) or relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise ArtifactError(f"{MANIFEST} in {directory} names {name!r}, which lies outside the artifact. Refusing it.")
    return Path(directory).resolve() / relative


def file_hashes(directory: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file of an artifact except the manifest itself (and its lock), by relative path."""
    root = Path(directory)
    return {path.relative_to(root).as_posix(): sha256_file(path)
            for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith((MANIFEST, f".{MANIFEST}")))}


def verify(directory: str | os.PathLike, ignore=()) -> None:
    """Check the artifact's files against the sha256 recorded in kiln.json; refuse a tampered or incomplete one.
    ``ignore``: names that may sit beside it (a hub repository's README.md)."""
    manifest = load_manifest(directory)
    recorded = manifest.get("files")
    if not recorded:
        raise ArtifactError(f"{directory}/{MANIFEST} records no file hashes to verify against (exported by an older "
                            "kiln). Re-export the artifact.")
    actual = file_hashes(directory)
    for name, digest in recorded.items():
        artifact_file(directory, name)
        if name not in actual:
            raise ArtifactError(f"{directory}: {name} is listed in {MANIFEST} but missing. Re-export the artifact.")
        if actual[name] != digest:
            raise ArtifactError(f"{directory}: {name} does not match the sha256 in {MANIFEST}: the artifact was "
                                "modified or corrupted after export. Re-export it or restore it from a trusted copy.")
    for entry in manifest.get("engines") or []:  # a plan is optional (built per GPU), but a present one must match
        name = entry.get("file") if isinstance(entry, dict) else None
        if isinstance(name, str) and name in actual and entry.get("sha256") and actual[name] != entry["sha256"]:
            raise ArtifactError(f"{directory}: {name} does not match the sha256 in {MANIFEST}: the engine was modified "
                                "or corrupted after `kiln build`. Delete it and build it again.")
    extra = sorted(set(actual) - set(recorded) - {"engines"})
    extra = [name for name in extra if not name.startswith("engines/") and name not in ignore]
    if extra:
        raise ArtifactError(f"{directory} holds files that were not exported with it: {', '.join(extra)}. Remove them "
                            "or re-export the artifact.")


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """The one writer of kiln.json: through a temp file and a rename, so a reader sees the old or the new file."""
    manifest = {"format_version": FORMAT_VERSION, **{k: v for k, v in manifest.items() if k != "format_version"}}
    staged = Path(directory, f".{MANIFEST}.tmp-{os.getpid()}")
    staged.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(staged, Path(directory, MANIFEST))


def update_manifest(directory: str | os.PathLike, change) -> dict:
    """Read kiln.json, apply ``change(manifest)`` (in place) and write it back, under a lock so that concurrent
    updaters (two ``kiln build`` runs) do not lose each other's entries. Returns the new manifest."""
    from filelock import FileLock

    with FileLock(str(Path(directory, f".{MANIFEST}.lock"))):
        manifest = load_manifest(directory)
        change(manifest)
        write_manifest(directory, manifest)
    return manifest


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = True, keep_failed: bool = False):
    """Yield a temp directory beside ``target``; on success it replaces ``target`` in (nearly) one rename.

    On an exception the temp directory is removed (or, with ``keep_failed``, moved to ``<target>.failed``) and
    ``target`` is left as it was. An existing ``target`` that is not a kiln artifact is never replaced. What earlier
    exports killed mid-way left beside ``target`` is cleaned up first (:func:`clean_leftovers`).
    """
    target = Path(target).resolve()
    clean_leftovers(target)  # first: it may put back an artifact a kill left aside
    if target.exists():
        if not target.is_dir():
            raise ArtifactError(f"{target} exists and is a file. Choose another output directory.")
        if any(target.iterdir()) and not is_artifact(target):
            raise ArtifactError(f"{target} exists and is not a kiln artifact; refusing to replace it. Choose an empty or new directory.")
        if not overwrite and is_artifact(target):
            raise ArtifactError(f"{target} already holds an artifact. Pass --force to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_owner()}-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        if keep_failed:
            failed = target.with_name(target.name + ".failed")
            shutil.rmtree(failed, ignore_errors=True)
            os.replace(tmp, failed)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Swap: the old artifact moves aside first so that `target` is only ever absent, never half-written. A kill
    # between the two renames leaves it in `.<name>.old-*/a`, which the next export puts back (clean_leftovers).
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{_owner()}-", dir=target.parent))
        os.replace(target, old / "a")
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _owner() -> str:
    """Who made a temp directory, in its name: a later export removes it once that process is gone."""
    return f"{os.getpid()}@{socket.gethostname()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def clean_leftovers(target: str | os.PathLike) -> list[Path]:
    """Remove what exports killed mid-way left beside ``target``: their temp directories (never artifacts: they get
    kiln.json last) and, where a kill fell between the swap's two renames, put the previous artifact back at
    ``target``. Only directories whose process is gone are touched, and only this host's: a PID from another host
    (a shared filesystem) says nothing about that process. Returns the directories removed."""
    target = Path(target)
    pattern = re.compile(re.escape(f".{target.name}.") + r"(tmp|old)-(\d+)@(.+)-[a-z0-9_]{8}")
    host, removed = socket.gethostname(), []
    for entry in sorted(target.parent.glob(glob.escape(f".{target.name}.") + "*")):
        match = pattern.fullmatch(entry.name)
        if not match or match[3] != host or not entry.is_dir() or _alive(int(match[2])):
            continue
        if match[1] == "old" and not target.exists() and is_artifact(entry / "a"):
            os.replace(entry / "a", target)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed
