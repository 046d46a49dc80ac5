"""Reading and writing Hugging Face checkpoints for the references of every framework.

``kiln.hub`` locates the files (converting other formats, such as GGUF, into safetensors first); this module reads
the tensors (safetensors, or ``pytorch_model.bin`` through ``torch.load(weights_only=True)`` only) as torch tensors
for the PyTorch references or NumPy arrays for the JAX and TensorFlow ones, checks every tensor against the model,
and writes
``save_pretrained`` output that transformers loads back. torch is imported only where a torch model needs it.

A reference of any framework offers ``state_dict()`` (kiln names -> arrays in PyTorch layout, e.g. Linear weights
(out, in)) and ``load_state_dict(state)``; that is all this module needs from it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from kiln import hub
from kiln.errors import CheckpointError

log = logging.getLogger("kiln")


def read_state_dict(files, framework: str = "torch") -> dict:
    """Every tensor of the checkpoint files by its Hugging Face name: torch tensors for ``framework="torch"``,
    NumPy arrays otherwise (bf16/fp16 weights are widened to float32 there: NumPy has no bfloat16)."""
    from safetensors import SafetensorError

    if framework == "torch":
        from safetensors.torch import load_file
    else:
        load_file = _load_numpy

    state: dict = {}
    for path in files:
        path = Path(path)
        if path.suffix == ".bin":
            import torch

            try:
                part = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # torch raises a zoo of pickle/zip errors; all mean the same here
                raise CheckpointError(f"Could not read {path} with torch.load(weights_only=True): {err}. "
                                      "Convert the checkpoint to safetensors or re-download it.") from err
            if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
                raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors), found "
                                      f"{type(part).__name__}. Save the weights with model.save_pretrained().")
            if framework != "torch":
                part = {name: value.float().numpy() if value.is_floating_point() else value.numpy()
                        for name, value in part.items()}
        else:
            try:
                part = load_file(path)
            except (SafetensorError, OSError, ValueError) as err:
                raise CheckpointError(f"{path} is not a readable safetensors file ({err}). "
                                      "The download may be truncated: re-download the checkpoint.") from err
        state.update(part)
    return state


def _load_numpy(path) -> dict[str, np.ndarray]:
    """safetensors -> NumPy, reading bf16 tensors (which safetensors.numpy cannot) as float32."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="numpy") as f:
        for name in f.keys():
            try:
                out[name] = f.get_tensor(name)
                if out[name].dtype.name == "bfloat16":  # readable once ml_dtypes registered the type: widen all the same
                    out[name] = out[name].astype(np.float32)
            except (TypeError, ValueError):  # bfloat16: widen through the raw bytes (bf16 is the top half of fp32)
                raw = f.get_slice(name)
                if raw.get_dtype() != "BF16":
                    raise
                out[name] = _bf16_to_float32(path, name, raw.get_shape())
    return out


def _bf16_to_float32(path, name: str, shape) -> np.ndarray:
    import struct

    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        begin, end = header[name]["data_offsets"]
        fh.seek(8 + n + begin)
        bits = np.frombuffer(fh.read(end - begin), dtype=np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32).reshape(shape)


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


def load_weights(model, state: dict, hf_name) -> None:
    """Copy a kiln-named state into ``model`` (any framework), naming any missing tensor or shape mismatch (in HF
    names)."""
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
    if _is_torch(model):
        import torch

        model.load_state_dict({n: torch.as_tensor(state[n]).to(torch.float32) for n in expected}, strict=True)
    else:
        model.load_state_dict({n: _as_numpy(state[n]).astype(np.float32) for n in expected})


def _is_torch(model) -> bool:
    return any(c.__module__.startswith("torch.") for c in type(model).__mro__)


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor handed to another framework's reference
        return value.detach().float().cpu().numpy()
    return np.asarray(value)


def attach_weights(model, weights, state: dict, unused: list[str], task: str):
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
    """Write config.json + model.safetensors atomically; the result loads with transformers' from_pretrained.
    ``hf_state`` holds torch tensors or NumPy arrays."""

    # transformers writes into an existing directory, keeping other files (tokenizer): do the same, but each file
    # through a temp name and a rename, so a crash never leaves a truncated config or weights file.
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw = {**config, "architectures": [architecture]}
    tmp_config, tmp_weights = directory / ".config.json.tmp", directory / ".model.safetensors.tmp"
    tmp_config.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    if all(isinstance(v, np.ndarray) for v in hf_state.values()):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in hf_state.items()}, tmp_weights, metadata={"format": "pt"})
    else:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in hf_state.items()}, tmp_weights, metadata={"format": "pt"})
    os.replace(tmp_weights, directory / "model.safetensors")
    os.replace(tmp_config, directory / "config.json")
    return directory


def replace_config(model, raw: dict, **fields) -> None:
    """Give ``model``, and every submodule holding its config, a copy with ``fields`` changed; ``raw`` is the same
    change as config.json spells it, kept in ``config.raw`` so that ``save_pretrained`` writes it."""
    import dataclasses

    config = model.config
    changed = dataclasses.replace(config, **fields, raw={**config.raw, **raw} if config.raw else {})
    for module in model.modules():
        if getattr(module, "config", None) is config:
            module.config = changed


class SavePretrainedMixin:
    """``model.save_pretrained(directory)`` and ``push_to_hub(repo_id)`` for the kiln references (needs ``self.config``
    and ``self.task``): writes the Hugging Face names and class, so ``transformers.AutoModel*.from_pretrained(directory)`` loads it back."""

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        import dataclasses

        from kiln.graphs import registry

        config = self.config
        raw = dict(config.raw) or {k: v for k, v in dataclasses.asdict(config).items() if k != "raw"}
        raw.setdefault("model_type", config.model_type)
        arch = registry.architecture(raw)
        hf_state = arch.weights.kiln_to_hf(self.state_dict(), config, self.task)
        return save_pretrained(directory, raw, hf_state, arch.hf_class(config.model_type, self.task))

    def push_to_hub(self, repo_id: str, *, private: bool = False, revision: str | None = None,
                    token: str | None = None, message: str = "Upload with kiln") -> str:
        """save_pretrained's files uploaded to ``repo_id`` in one commit; returns the commit URL."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="kiln-push-") as tmp:
            self.save_pretrained(tmp)
            return hub.push_folder(tmp, repo_id, sorted(p.name for p in Path(tmp).iterdir()), private=private,
                                   revision=revision, token=token, message=message)


def from_pretrained(path_or_id, task: str = "feature-extraction", revision: str | None = None, attn_impl: str = "sdpa",
                    framework: str = "torch"):
    """Build the kiln reference for ``task`` from a local directory or hub id, in ``framework`` (torch, jax, tf);
    a torch model is returned in eval mode."""
    from kiln.graphs import registry

    checkpoint = hub.resolve(path_or_id, revision)
    raw = hub.read_config(checkpoint)
    arch = registry.architecture(raw)
    arch.check_task(raw["model_type"], task)
    arch.check_framework(raw["model_type"], framework)
    state = read_state_dict(checkpoint.weight_files, framework)
    model = registry.build(raw, task, state, attn_impl=attn_impl, framework=framework)
    model.checkpoint = checkpoint
    return model.eval() if framework == "torch" else model
