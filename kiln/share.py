"""Sharing artifacts through the Hugging Face hub: ``kiln push OUT ORG/NAME`` and ``kiln.pipeline(task, "ORG/NAME")``.

An artifact is uploaded as it is (kiln.json, the graph and its weights file, the config and preprocessing files;
``engines/`` only when asked: a TensorRT plan runs on one GPU model with one TensorRT version) with a generated model
card (README.md: where it came from, the task, the precision, the validation figures, how to run it). Pulling by id
downloads through huggingface_hub's cache (revision-pinned, ``HF_HUB_OFFLINE`` honoured) exactly the files kiln.json
lists, then checks every one against its sha256 before anything runs it; an unknown format version is refused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kiln import hub
from kiln.artifact import MANIFEST, load_manifest, verify
from kiln.errors import ArtifactError, InputError
from kiln.files import read_json

log = logging.getLogger("kiln")
HUB_FILES = ("README.md", ".gitattributes")  # what a hub repository holds beside the artifact's own files


def push_artifact(artifact, repo_id: str, *, private: bool = False, revision: str | None = None,
                  token: str | None = None, include_engines: bool = False) -> str:
    """Upload ``artifact`` to ``repo_id`` with a model card; returns the commit URL. The artifact is verified first:
    a tampered or incomplete one is not shared."""
    artifact = Path(artifact)
    hub.check_repo_id(repo_id)
    verify(artifact)
    manifest = load_manifest(artifact)
    files = [MANIFEST, *manifest["files"]]
    if include_engines:
        files += engine_files(manifest, artifact)
    card = model_card(manifest, repo_id).encode("utf-8")
    url = hub.push_folder(artifact, repo_id, files, extra={"README.md": card}, private=private, revision=revision,
                          token=token, message=f"kiln artifact: {manifest.get('model_type')} {manifest['task']} "
                                               f"({manifest.get('precision', 'fp32')})")
    log.info("Pushed %s to %s", artifact, url)
    return url


def engine_files(manifest: dict, directory: Path | None = None) -> list[str]:
    """The TensorRT plans kiln.json records (those present in ``directory`` when given)."""
    engines = manifest.get("engines") if isinstance(manifest.get("engines"), list) else []
    names = [e["file"] for e in engines if isinstance(e, dict) and isinstance(e.get("file"), str)]
    return sorted(n for n in names if directory is None or (directory / n).is_file())


def model_card(manifest: dict, repo_id: str) -> str:
    """README.md: front matter the hub reads, then what the artifact is and how to run it."""
    source = manifest.get("source") or {}
    validation = manifest.get("validation") or {}
    task_metric = {k: v for k, v in (validation.get("task") or {}).items() if k != "gate"}
    worst = max((e.get("max_abs", 0.0) for e in (validation.get("outputs") or {}).values()), default=0.0)
    base = source.get("id") if is_repo_id(source.get("id")) else None  # a hub checkpoint, not a local path
    front = ["---", "library_name: kiln", f"pipeline_tag: {manifest['task']}",
             "tags:", "- kiln", "- onnx", f"- {manifest.get('precision', 'fp32')}"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    accuracy = manifest.get("accuracy") or {}
    lines = [f"# {repo_id}", "",
             f"A [kiln](https://github.com/) artifact: {manifest.get('model_type')} for `{manifest['task']}`, "
             f"{manifest.get('precision', 'fp32')}, ONNX opset {manifest.get('opset')}, attention "
             f"{(manifest.get('attention') or {}).get('form', 'onnx')}.", "",
             f"- Source: `{source.get('id')}`" + (f" at revision `{source['revision']}`" if source.get("revision") else "")
             + f", weights sha256 `{source.get('weights_sha256')}`",
             f"- Validated against the reference: max abs difference {worst:.3g}"
             + "".join(f", {k} {v}" for k, v in task_metric.items()),
             *([f"- {manifest.get('precision')} accuracy against fp32: "
                + ", ".join(f"{k} {v}" for k, v in accuracy.items() if isinstance(v, (int, float)) and k != 'gate')]
               if accuracy else []),
             f"- kiln {manifest.get('kiln_version')}, onnx {(manifest.get('export') or {}).get('onnx')}, "
             f"onnxruntime {(manifest.get('export') or {}).get('onnxruntime')}", "",
             "## Run it", "", "```python", "import kiln", "",
             f"pipe = kiln.pipeline({manifest['task']!r}, {repo_id!r})   # downloads, verifies every file, runs",
             "```", "", "```bash", f"kiln run {repo_id} \"...\"", "```", ""]
    return "\n".join(front + [""] + lines)


def pull_artifact(repo_id: str, revision: str | None = None) -> Path | None:
    """The local copy of the artifact at ``repo_id``, downloaded through huggingface_hub's cache and verified; None
    when the repository holds no kiln.json (a plain checkpoint, for the exporter)."""
    from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    hub.check_repo_id(repo_id)
    offline = hub._offline()
    with hub.hub_errors(repo_id, revision):
        try:
            manifest_path = Path(hf_hub_download(repo_id, MANIFEST, revision=revision, endpoint=hub.endpoint(),
                                                 local_files_only=offline))
        except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: caught first
            if offline and not isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
                raise  # neither pulled nor a cached checkpoint: hub_errors says so
            return None  # a cached checkpoint (offline), or a hub that could not say: the exporter takes it from here
        except EntryNotFoundError:
            return None
    manifest = read_json(manifest_path, f"The copy of {repo_id} on the hub is damaged: push it again.")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not listed:
        raise ArtifactError(f"{repo_id}: kiln.json lists no files to verify, so kiln will not run it. Re-export "
                            "and push it again with this kiln.")
    with hub.hub_errors(repo_id, revision):
        directory = Path(snapshot_download(repo_id, revision=revision, endpoint=hub.endpoint(),
                                           allow_patterns=[MANIFEST, *listed, *engine_files(manifest)],
                                           local_files_only=offline))
    missing = [name for name in listed if not (directory / name).is_file()]
    if missing:
        raise ArtifactError(f"{repo_id}: the hub copy lacks {', '.join(missing[:5])}, which kiln.json lists: it is "
                            "incomplete. Push the artifact again.")
    verify(directory, ignore=HUB_FILES)  # sha256 of every file before anything loads it
    return directory


def is_repo_id(model) -> bool:
    """A string that names a hub repository rather than a local path."""
    if not isinstance(model, str) or os.path.exists(model) or model.startswith((".", "/", "~")):
        return False
    return model.count("/") == 1 and all(model.split("/"))


__all__ = ["engine_files", "is_repo_id", "model_card", "pull_artifact", "push_artifact", "InputError"]
