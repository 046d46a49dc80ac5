"""Model id or path -> a local Hugging Face style checkpoint directory: download, cache, revision and offline
handling through huggingface_hub; other checkpoint formats converted once into that form.

Everything downstream reads one format: ``config.json`` + safetensors (or ``pytorch_model.bin``) + tokenizer files.
A llama.cpp GGUF file is converted at resolve time (``kiln.hub.gguf``) into such a directory in kiln's cache, keyed by
the file's sha256, so the references, the exporter and the cache need not know GGUF; ``Checkpoint.origin`` remembers
the file it came from.

Nothing here imports a framework. Weights are only *located* (and hashed) here; ``kiln.graphs.checkpoint`` reads them.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from kiln.errors import CheckpointError, ConfigError
from kiln.files import read_json, sha256_files  # noqa: F401 (sha256_files: part of this module's interface)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "spm.model",  # DeBERTa-v3
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",  # transformers 5 saves the chat template beside tokenizer_config.json
)
PROCESSOR_FILES = ("preprocessor_config.json", "generation_config.json")
# What a snapshot download needs; never the other frameworks' weight files.
_ALLOW_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES,
                   "preprocessor_config.json", "generation_config.json"]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint resolved to a local Hugging Face style directory."""

    source: str  # what the user gave: a hub id or a path
    path: Path  # config.json, weights, tokenizer files (for a converted format, kiln's converted copy)
    revision: str | None = None
    weight_files: tuple[Path, ...] = field(default=())
    origin: tuple[Path, ...] = field(default=())  # the files it was converted from (a GGUF file), if any

    @property
    def source_files(self) -> tuple[Path, ...]:
        """The files the user's checkpoint holds its weights in: what kiln.json hashes and names."""
        return self.origin or self.weight_files

    @property
    def source_dir(self) -> Path:
        return self.origin[0].parent if self.origin else self.path

    @property
    def weight_format(self) -> str:
        if self.origin:
            return "gguf"
        return "pytorch" if self.weight_files and self.weight_files[0].suffix == ".bin" else "safetensors"


def cache_root() -> Path:
    """kiln's cache (``KILN_CACHE``, default ~/.cache/kiln): converted checkpoints and exported artifacts."""
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve(path_or_id: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    """Resolve a local directory or a hub id to a local directory holding ``config.json`` and weights, or a GGUF
    file (or a directory holding exactly one ``.gguf`` and no config.json) to a checkpoint read from that file."""
    source = str(path_or_id)
    local = Path(source).expanduser()
    if local.is_dir():
        ggufs = sorted(local.glob("*.gguf"))
        if ggufs and not (local / "config.json").is_file():
            if len(ggufs) > 1:
                shown = ", ".join(p.name for p in ggufs[:4])
                raise CheckpointError(f"{source} holds {len(ggufs)} GGUF files ({shown}) and no config.json; "
                                      "give the path of the one to use.")
            return _gguf_checkpoint(source, ggufs[0], revision)
        read_config(local)  # config problems first: they say more than a missing weights file
        return Checkpoint(source, local.resolve(), revision, find_weights(local))
    if local.is_file() and local.suffix.lower() == ".gguf":
        return _gguf_checkpoint(source, local, revision)
    if local.exists():
        raise CheckpointError(f"{source} is a file; give the checkpoint directory that holds config.json and the "
                              "weights, or a .gguf file.")
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or not source.strip():
        raise CheckpointError(f"No checkpoint directory at {source!r}. Check the path.")
    return _download(source, revision)


def _gguf_checkpoint(source: str, file: Path, revision: str | None) -> Checkpoint:
    from kiln.hub import gguf

    file = file.resolve()
    directory = gguf.convert(file, cache_root() / "checkpoints")
    return Checkpoint(source, directory, revision, find_weights(directory), origin=(file,))


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None):
    """huggingface_hub's errors about ``repo_id`` as CheckpointErrors that name the fix (downloads of checkpoints
    and of shared artifacts alike)."""
    from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        yield
    except HFValidationError as err:
        raise CheckpointError(f"{repo_id!r} is neither a checkpoint directory nor a valid hub id ({err}). "
                              "Check the path or the model id.") from err
    except LocalEntryNotFoundError as err:
        where = "HF_HUB_OFFLINE=1 is set" if _offline() else "the hub could not be reached"
        raise CheckpointError(
            f"{repo_id!r} (revision {revision or 'main'}) is not in the local Hugging Face cache and {where}. "
            f"Download it once with network access (hf download {repo_id}), or pass a local directory."
        ) from err
    except RevisionNotFoundError as err:
        raise CheckpointError(f"{repo_id!r} has no revision {revision!r}. Check the branch, tag or commit.") from err
    except RepositoryNotFoundError as err:
        raise CheckpointError(f"No repository {repo_id!r} on the hub (or it is private: log in with `hf auth "
                              "login`).") from err
    except (HfHubHTTPError, OSError) as err:
        raise CheckpointError(f"Could not download {repo_id!r}: {err}") from err


def _download(repo_id: str, revision: str | None) -> Checkpoint:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = _offline()
    with hub_errors(repo_id, revision):
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_ALLOW_PATTERNS, local_files_only=offline))
    read_config(path)
    if not any((path / name).is_file() for name in WEIGHT_FILES[:2]):
        # Only legacy pickled weights on the hub: fetch them too (read later with torch.load(weights_only=True)).
        try:
            path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[*_ALLOW_PATTERNS, "pytorch_model.bin"],
                                          local_files_only=offline))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError):
            pass  # find_weights below names what is missing
    return Checkpoint(repo_id, path, revision, find_weights(path))


def find_weights(directory: Path) -> tuple[Path, ...]:
    """The weight files of a checkpoint directory, safetensors first; a sharded index lists its shards."""
    directory = Path(directory)
    single = directory / "model.safetensors"
    if single.is_file():
        return (single,)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                    isinstance(name, str) and not Path(name).is_absolute() and ".." not in Path(name).parts
                    for name in weight_map.values()):
                raise TypeError("'weight_map' must map tensor names to shard file names in the same directory")
        # ValueError covers bad JSON and UTF-8 and over-long integers; RecursionError, hostile nesting depth.
        except (ValueError, RecursionError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {err}") from err
        shards = tuple(directory / name for name in sorted(set(weight_map.values())))
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}. Re-download the checkpoint.")
        return shards
    legacy = directory / "pytorch_model.bin"
    if legacy.is_file():
        return (legacy,)
    raise CheckpointError(
        f"No weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}. "
        "Save the model with save_pretrained() or point at the right directory."
    )


def read_config(directory: Checkpoint | str | os.PathLike) -> dict:
    """Read ``config.json`` as a dict, with errors that name the file. Given a ``.gguf`` file, the config derived from
    its metadata (what its converted checkpoint holds)."""
    if isinstance(directory, Checkpoint):
        directory = directory.path
    if Path(directory).suffix.lower() == ".gguf" and Path(directory).is_file():
        from kiln.hub import gguf

        return gguf.read_config(directory)
    path = Path(directory) / "config.json"
    return read_json(path, "Restore it from the original checkpoint.", error=ConfigError,
                     missing=f"No config.json in {directory}. A checkpoint directory needs config.json next to its "
                             "weights.")


def copy_preprocessing_files(source: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """Copy the tokenizer, image processor and generation files of checkpoint directory ``source`` into ``target``;
    returns the names copied."""
    import shutil

    copied = []
    for name in (*TOKENIZER_FILES, *PROCESSOR_FILES):
        if Path(source, name).is_file():
            shutil.copyfile(Path(source, name), Path(target, name))
            copied.append(name)
    return copied


def endpoint() -> str | None:
    """The hub to talk to: ``HF_ENDPOINT`` as set when called (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT") or None


def check_repo_id(repo_id) -> str:
    """A hub repository id ("org/name"), or an InputError saying what is wrong with it."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from kiln.errors import InputError

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise InputError(f"{repo_id!r:.100} is not a hub repository id: write it as 'org/name' (or 'user/name').")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise InputError(f"{repo_id!r} is not a valid hub repository id: {err}") from None
    return repo_id


def push_folder(directory: str | os.PathLike, repo_id: str, files: list[str], *, extra: dict[str, bytes] | None = None,
                private: bool = False, revision: str | None = None, token: str | None = None,
                message: str = "Upload with kiln") -> str:
    """Upload ``files`` (paths relative to ``directory``) and ``extra`` (name -> bytes) to ``repo_id`` in one commit,
    creating the repository (and the ``revision`` branch) when missing; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_repo_id(repo_id)
    api = HfApi(endpoint=endpoint(), token=token)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(directory) / name)) for name in files]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in (extra or {}).items()]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    except HfHubHTTPError as err:
        raise CheckpointError(f"Could not upload to {repo_id!r}: {err}. Check that your token (`hf auth login`, or "
                              "HF_TOKEN) has write access to it.") from err
    return str(info.commit_url)
