"""What timing an artifact on this machine needs, below the benchmark and the exporter: feeds shaped like the
pipelines' (``Feeds``) and the machine's description (``machine``)."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from kiln.errors import InputError


class Feeds:
    """Feeds shaped like what the pipelines send, for timing an artifact (kiln bench, export --precision auto):
    random token ids in the vocabulary, a full attention mask, empty caches, random images."""

    def __init__(self, manifest: dict, config: dict):
        self.inputs = {t["name"]: t for t in manifest["inputs"]}
        self.vocab = int(config.get("vocab_size") or 1000)
        self.axes = manifest.get("dynamic_axes", {})

    def limit(self, axis: str) -> int | None:
        return self.axes.get(axis, {}).get("max")

    def __call__(self, batch: int, seq: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(batch * 100003 + seq)
        feed = {}
        for name, t in self.inputs.items():
            if name == "input_ids":
                feed[name] = rng.integers(min(100, self.vocab - 1), self.vocab, size=(batch, seq), dtype=np.int64)
            elif name in ("attention_mask",):
                feed[name] = np.ones((batch, seq), dtype=np.int64)
            elif name in ("token_type_ids",):
                feed[name] = np.zeros((batch, seq), dtype=np.int64)
            elif name == "position_ids":
                feed[name] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
            elif name == "pixel_values":
                shape = [batch if d == "batch" else d for d in t["shape"]]
                feed[name] = rng.standard_normal(shape, dtype=np.float32)
            elif name.startswith("past_key_values."):
                _, heads, _, dim = t["shape"]
                feed[name] = np.zeros((batch, heads, 0, dim), dtype=t["dtype"])
            else:
                raise InputError(f"kiln does not know how to fill input {name!r} of this artifact.")
        return feed


def machine(threads: int | None) -> dict:
    import os

    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__}
