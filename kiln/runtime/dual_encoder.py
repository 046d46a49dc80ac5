"""An image + text artifact (CLIP, SigLIP): its two towers, each its own engine, and how their embeddings score.

The artifact holds ``text.onnx`` (the main graph in kiln.json) and ``vision.onnx`` (kiln.json ``vision``); each gives
projected embeddings before normalization (``text_embeds``, ``image_embeds``). kiln.json ``zero_shot`` holds what
scoring needs from the weights: ``logit_scale`` (already exponentiated), ``logit_bias`` (SigLIP), the function that
turns logits into scores (CLIP: softmax over the labels; SigLIP: a sigmoid per label) and how the text is padded
(SigLIP was trained on text padded to 64 tokens and pools the last position, so its prompts must be too).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from kiln.errors import ArtifactError
from kiln.runtime.engines import open_engine
from kiln.runtime.scores import normalize_rows, sigmoid, softmax

CACHED_LABEL_SETS = 32  # text embeddings kept per (labels, template): services ask the same labels again and again


def is_dual_encoder(manifest: dict) -> bool:
    return "zero_shot" in manifest and "vision" in manifest


class DualEncoder:
    """The text engine (the pipeline's own, the artifact's main graph) and the vision engine, opened on first use."""

    def __init__(self, path: Path, manifest: dict, text_engine, tokenizer, *, device: str = "cpu",
                 threads: int | None = None):
        if not is_dual_encoder(manifest):
            raise ArtifactError(f"{path} is not an image + text artifact (kiln.json has no 'vision' graph and "
                                "'zero_shot' facts). Export a CLIP or SigLIP checkpoint with --task "
                                "zero-shot-image-classification.")
        self.path, self.manifest, self.text_engine, self.tokenizer = path, manifest, text_engine, tokenizer
        self.device, self.threads = device, threads
        facts = manifest["zero_shot"]
        self.logit_scale, self.logit_bias = float(facts["logit_scale"]), facts.get("logit_bias")
        self.function = facts["function"]
        self.text_length = facts.get("text_max_length")  # pad every prompt to this many tokens (SigLIP)
        self.text_inputs = [i.name for i in text_engine.inputs()]
        self._vision = None
        self._lock = threading.Lock()
        self._labels: OrderedDict = OrderedDict()

    @property
    def vision_engine(self):
        with self._lock:
            if self._vision is None:
                record = self.manifest["vision"]  # the graph's own file, inputs and precision over the artifact's
                self._vision = open_engine(self.path / record["model"], device=self.device, threads=self.threads,
                                           manifest={**self.manifest, **record})
        return self._vision

    def text_embeddings(self, texts: list[str], batch_size: int, truncation: bool = True,
                        normalized: bool = True) -> np.ndarray:
        """(N, P) text embeddings, normalized unless asked not to, batch_size texts per engine call."""
        rows = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start:start + batch_size], truncation=truncation,
                                   max_length=self.text_length)
            feed = batch.feed(self.text_inputs)
            if self.text_length:  # SigLIP: every row padded to the length it was trained at
                missing = self.text_length - feed["input_ids"].shape[1]
                feed = {k: np.pad(v, ((0, 0), (0, missing)), constant_values=self.tokenizer.pad_id if
                                  k == "input_ids" else 0) for k, v in feed.items()}
            rows.append(self.text_engine.run(feed)["text_embeds"])
        embeddings = np.concatenate(rows).astype(np.float32)
        return normalize_rows(embeddings) if normalized else embeddings

    def image_embeddings(self, pixel_values: np.ndarray, batch_size: int, normalized: bool = True) -> np.ndarray:
        engine = self.vision_engine
        rows = [engine.run({"pixel_values": pixel_values[i:i + batch_size]})["image_embeds"]
                for i in range(0, len(pixel_values), batch_size)]
        embeddings = np.concatenate(rows).astype(np.float32)
        return normalize_rows(embeddings) if normalized else embeddings

    def label_embeddings(self, labels: list[str], template: str, batch_size: int) -> np.ndarray:
        """The prompts' normalized embeddings, cached per (labels, template)."""
        key = (tuple(labels), template)
        with self._lock:
            cached = self._labels.get(key)
            if cached is not None:
                self._labels.move_to_end(key)
                return cached
        embeddings = self.text_embeddings([template.format(label) for label in labels], batch_size)
        with self._lock:
            self._labels[key] = embeddings
            while len(self._labels) > CACHED_LABEL_SETS:
                self._labels.popitem(last=False)
        return embeddings

    def scores(self, images: np.ndarray, texts: np.ndarray) -> np.ndarray:
        """(N images, M texts) scores from normalized embeddings: softmax over the texts (CLIP) or a sigmoid each."""
        logits = self.logit_scale * (images @ texts.T) + (self.logit_bias or 0.0)
        return sigmoid(logits) if self.function == "sigmoid" else softmax(logits)

    def close(self) -> None:
        if self._vision is not None:
            self._vision.close()
