"""A thin, thread-safe wrapper over Hugging Face ``tokenizers``: padding, truncation with a warning, pairs, offsets.

The underlying ``tokenizers.Tokenizer`` is configured once when loaded (truncation on, padding off: kiln pads in
numpy) and never mutated afterwards, so one wrapper can serve many threads.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.errors import ArtifactError, InputError

log = logging.getLogger("kiln")
_UNSET_MAX = 10**12  # transformers writes int(1e30) as model_max_length when a checkpoint does not know it


@dataclass
class Batch:
    """Model inputs as int64 arrays plus what postprocessing needs."""

    input_ids: np.ndarray  # (B, T)
    attention_mask: np.ndarray  # (B, T)
    token_type_ids: np.ndarray  # (B, T)
    offsets: list[list[tuple[int, int]]]  # per item, per token: (start, end) character offsets
    special_tokens_mask: np.ndarray  # (B, T) 1 for [CLS]/[SEP]/padding
    truncated: list[bool]

    def feed(self, names) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in names}


class Tokenizer:
    def __init__(self, tokenizer, *, max_length: int, padding_side: str = "right", pad_token: str | None = None):
        self._tok = tokenizer
        self.max_length = max_length
        self.padding_side = padding_side
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)
        self.pad_token = pad_token
        self.pad_id = tokenizer.token_to_id(pad_token) if pad_token else None
        if self.pad_id is None:
            self.pad_id = 0
        self._variants: dict[int, object] = {max_length: tokenizer}
        self._lock = threading.Lock()

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, max_length: int | None = None) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ArtifactError(f"No tokenizer.json in {directory}. Text pipelines need the fast tokenizer file: "
                                "save it with transformers' tokenizer.save_pretrained() and re-export.")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for parse errors
            raise ArtifactError(f"{path} could not be read by tokenizers ({err}). Restore it from the checkpoint.") from err
        config = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ArtifactError(f"{config_path} is not valid JSON ({err}). Restore it from the checkpoint.") from err
        limit = config.get("model_max_length")
        limits = [m for m in (max_length, limit if isinstance(limit, int) and limit < _UNSET_MAX else None) if m]
        pad_token = config.get("pad_token")
        if isinstance(pad_token, dict):  # AddedToken serialised
            pad_token = pad_token.get("content")
        return cls(tok, max_length=min(limits) if limits else 512, padding_side=config.get("padding_side", "right"),
                   pad_token=pad_token)

    def _with_max_length(self, max_length: int):
        with self._lock:
            if max_length not in self._variants:
                from tokenizers import Tokenizer as HFTokenizer

                tok = HFTokenizer.from_str(self._tok.to_str())
                tok.no_padding()
                tok.enable_truncation(max_length)
                self._variants[max_length] = tok
            return self._variants[max_length]

    def __call__(self, texts, pairs=None, *, truncation: bool = True, max_length: int | None = None) -> Batch:
        texts = check_texts(texts)
        if pairs is not None:  # one text_pair (or None) per text
            pairs = [None if p is None else check_texts(p, what="text_pair")[0] for p in pairs]
            if len(pairs) != len(texts):
                raise InputError(f"Got {len(texts)} texts but {len(pairs)} text pairs; give one pair per text.")
        limit = min(max_length or self.max_length, self.max_length)
        tok = self._with_max_length(limit if truncation else self.max_length)
        items = [t if p is None else (t, p) for t, p in zip(texts, pairs)] if pairs is not None else texts
        encodings = tok.encode_batch(items, add_special_tokens=True)
        truncated = [bool(e.overflowing) for e in encodings]
        if any(truncated):
            if not truncation:
                raise InputError(f"An input is longer than the model's maximum of {self.max_length} tokens. "
                                 "Shorten it or call with truncation=True.")
            log.warning("Truncated %d input(s) to %d tokens (the model's maximum).", sum(truncated), limit)
        return self._pad(encodings, truncated)

    def _pad(self, encodings, truncated) -> Batch:
        B, T = len(encodings), max(len(e.ids) for e in encodings)
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, T), dtype=np.int64)
        types = np.zeros((B, T), dtype=np.int64)
        special = np.ones((B, T), dtype=np.int64)
        offsets = []
        for b, e in enumerate(encodings):
            n = len(e.ids)
            where = slice(T - n, T) if self.padding_side == "left" else slice(0, n)
            ids[b, where], mask[b, where], types[b, where] = e.ids, e.attention_mask, e.type_ids
            special[b, where] = e.special_tokens_mask
            offsets.append([tuple(o) for o in e.offsets])
        return Batch(ids, mask, types, offsets, special, truncated)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)


def check_texts(texts, what: str = "input") -> list[str]:
    """A str or a non-empty list of str, else an InputError naming what is wrong."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)):
        raise InputError(f"The {what} is bytes; decode it to str first (e.g. data.decode('utf-8')).")
    if not isinstance(texts, (list, tuple)):
        raise InputError(f"The {what} must be a string or a list of strings, got {type(texts).__name__}.")
    if not texts:
        raise InputError(f"The {what} list is empty; give at least one string.")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"The {what} list must hold only strings; item {i} is {type(t).__name__}.")
    return list(texts)
