"""Reading and writing Hugging Face checkpoints for the PyTorch references.

``kiln.hub`` locates the files; this module reads the tensors (safetensors, ``pytorch_model.bin`` through
``torch.load(weights_only=True)`` only, or a GGUF file through ``kiln.gguf``), checks every tensor against the model,
and writes ``save_pretrained`` output that transformers loads back.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from kiln import hub
from kiln.errors import CheckpointError

log = logging.getLogger("kiln")


def read_state_dict(files) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in files:
        path = Path(path)
        if path.suffix.lower() == ".gguf":  # llama.cpp file: dequantized to float32, HF names, Q/K rows in HF order
            from kiln import gguf

            part = {name: torch.from_numpy(array) for name, array in gguf.read_tensors(path).items()}
        elif path.suffix == ".bin":
            try:
                part = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # torch raises a zoo of pickle/zip errors; all mean the same here
                raise CheckpointError(f"Could not read {path} with torch.load(weights_only=True): {err}. "
                                      "Convert the checkpoint to safetensors or re-download it.") from err
            if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
                raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors), found "
                                      f"{type(part).__name__}. Save the weights with model.save_pretrained().")
        else:
            try:
                part = load_file(path)
            except (SafetensorError, OSError, ValueError) as err:
                raise CheckpointError(f"{path} is not a readable safetensors file ({err}). "
                                      "The download may be truncated: re-download the checkpoint.") from err
        state.update(part)
    return state


def rename(state: dict, rules: list[tuple[str, str]]) -> tuple[dict, list[str]]:
    """Rename ``.weight``/``.bias`` keys by (from prefix, to prefix) rules, where '{i}' stands for a layer index.
    Returns (renamed, unmatched keys). Each architecture's weights.py holds its rules as one table."""
    import re

    compiled = [(re.compile("^" + re.escape(a).replace(r"\{i\}", r"(\d+)") + r"\.(weight|bias)$"), b) for a, b in rules]
    out, unmatched = {}, []
    for key, value in state.items():
        for pattern, target in compiled:
            m = pattern.match(key)
            if m:
                *index, kind = m.groups()
                name = target.replace("{i}", index[0]) if index else target
                out[f"{name}.{kind}"] = value
                break
        else:
            unmatched.append(key)
    return out, unmatched


def load_weights(model: torch.nn.Module, state: dict, hf_name) -> None:
    """Copy a kiln-named state into ``model``, naming any missing tensor or shape mismatch (in HF names)."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    if missing:
        shown = ", ".join(hf_name(n) for n in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"The checkpoint lacks {len(missing)} weight(s) the model needs: {shown}. "
                              "Check that the checkpoint matches config.json (model_type, layers, task).")
    for name, param in expected.items():
        value = state[name]
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(f"Weight {hf_name(name)} has shape {tuple(value.shape)} in the checkpoint but "
                                  f"config.json implies {tuple(param.shape)}. The config and weights do not match.")
    model.load_state_dict({n: state[n].to(torch.float32) for n in expected}, strict=True)


def attach_weights(model: torch.nn.Module, weights, state: dict, unused: list[str], task: str) -> torch.nn.Module:
    """The tail of every architecture's ``build``: warn about checkpoint tensors kiln does not use, load the
    kiln-named ``state`` (errors name tensors by their Hugging Face names, via ``weights.kiln_to_hf``)."""
    if unused:
        log.warning("Unused checkpoint tensors: %s", ", ".join(unused[:8]))
    names = weights.kiln_to_hf({k: None for k in model.state_dict()}, model.config, task)
    hf_name = dict(zip(model.state_dict(), names))
    load_weights(model, state, lambda n: hf_name.get(n, n))
    model.task = task
    return model


def save_pretrained(directory: str | os.PathLike, config: dict, hf_state: dict, architecture: str) -> Path:
    """Write config.json + model.safetensors atomically; the result loads with transformers' from_pretrained."""
    from safetensors.torch import save_file

    # transformers writes into an existing directory, keeping other files (tokenizer): do the same, but each file
    # through a temp name and a rename, so a crash never leaves a truncated config or weights file.
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw = {**config, "architectures": [architecture]}
    tmp_config, tmp_weights = directory / ".config.json.tmp", directory / ".model.safetensors.tmp"
    tmp_config.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    save_file({k: v.detach().contiguous() for k, v in hf_state.items()}, tmp_weights, metadata={"format": "pt"})
    os.replace(tmp_weights, directory / "model.safetensors")
    os.replace(tmp_config, directory / "config.json")
    return directory


class SavePretrainedMixin:
    """``model.save_pretrained(directory)`` for the kiln references (needs ``self.config`` and ``self.task``): writes
    the Hugging Face names and class, so ``transformers.AutoModel*.from_pretrained(directory)`` loads it back."""

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        import dataclasses

        from kiln.graphs import registry

        config = self.config
        raw = dict(config.raw) or {k: v for k, v in dataclasses.asdict(config).items() if k != "raw"}
        raw.setdefault("model_type", config.model_type)
        weights = registry.architecture(raw).weights
        hf_state = weights.kiln_to_hf(self.state_dict(), config, self.task)
        return save_pretrained(directory, raw, hf_state, weights.ARCHITECTURE_NAMES[(config.model_type, self.task)])


def from_pretrained(path_or_id, task: str = "feature-extraction", revision: str | None = None, attn_impl: str = "sdpa"):
    """Build the kiln reference for ``task`` from a local directory or hub id; returns the model in eval mode."""
    from kiln.graphs import registry

    checkpoint = hub.resolve(path_or_id, revision)
    raw = hub.read_config(checkpoint)
    registry.check_task(raw, task)
    arch = registry.architecture(raw)
    state = read_state_dict(checkpoint.weight_files)
    model = arch.build(raw, task, state, attn_impl=attn_impl)
    model.checkpoint = checkpoint
    return model.eval()
