"""A thin, thread-safe wrapper over Hugging Face ``tokenizers``: padding, truncation with a warning, pairs, offsets.

The underlying ``tokenizers.Tokenizer`` is configured once when loaded (truncation on, padding off: kiln pads in
numpy) and not mutated by encoding, so one wrapper can serve many threads. ``add_tokens`` is the exception: it
changes the vocabulary, so call it before the tokenizer serves anything (as when preparing a checkpoint), then
``save_pretrained``.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.errors import ArtifactError, InputError
from kiln.files import read_json

log = logging.getLogger("kiln")
_UNSET_MAX = 10**12  # transformers writes int(1e30) as model_max_length when a checkpoint does not know it
_MAX_VARIANTS = 8  # differently truncating copies of one tokenizer kept at once (each holds the whole vocabulary)


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


@dataclass
class Windows(Batch):
    """Text pairs split into overlapping windows (transformers' ``return_overflowing_tokens=True``): one row per
    window, ``example[row]`` is the pair it came from. Per-row lists cover the real tokens only, not the padding."""

    example: np.ndarray  # (N,) index of the pair each window belongs to
    sequence_ids: list[list[int | None]]  # per window, per token: 0 first text, 1 second text, None special
    word_ids: list[list[int | None]]  # per window, per token: word index within its own text, None special
    padding_left: bool = False

    def tokens(self, row: int) -> slice:
        """Where the real tokens of ``row`` sit in the padded arrays."""
        n, T = len(self.offsets[row]), self.input_ids.shape[1]
        return slice(T - n, T) if self.padding_left else slice(0, n)


class Tokenizer:
    def __init__(self, tokenizer, *, max_length: int, padding_side: str = "right", pad_token: str | None = None,
                 special_tokens: dict[str, str] | None = None, clean_up_tokenization_spaces: bool = False,
                 config: dict | None = None, source: Path | None = None):
        self._tok = tokenizer
        self._config, self._source = dict(config or {}), source  # tokenizer_config.json and where it came from
        self.special_tokens = dict(special_tokens or {})  # e.g. {"mask_token": "[MASK]", "unk_token": "[UNK]"}
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.max_length = max_length
        self.padding_side = padding_side
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)
        self.pad_token = pad_token
        self.pad_id = tokenizer.token_to_id(pad_token) if pad_token else None
        if self.pad_id is None:
            self.pad_id = 0
        # Configured copies keyed by (max_length, stride, strategy); max_length None = no truncation.
        self._base_key = (max_length, 0, "longest_first")
        self._variants: dict[tuple, object] = {self._base_key: tokenizer}
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
        config_path = directory / "tokenizer_config.json"
        config = read_json(config_path, "Restore it from the checkpoint.") if config_path.is_file() else {}
        limit = config.get("model_max_length")
        usable = isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < _UNSET_MAX
        limits = [m for m in (max_length, limit if usable else None) if m]
        pad_token = config.get("pad_token")
        if isinstance(pad_token, dict):  # AddedToken serialised
            pad_token = pad_token.get("content")
        padding_side = config.get("padding_side", "right")
        if padding_side not in ("left", "right"):
            raise ArtifactError(f"{config_path} has padding_side {padding_side!r:.100}; it must be 'left' or 'right'. "
                                "Fix the file or restore it from the checkpoint.")
        return cls(tok, max_length=min(limits) if limits else 512, padding_side=padding_side,
                   pad_token=pad_token if isinstance(pad_token, str) else None,
                   special_tokens=_special_tokens(directory, config),
                   clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
                   config=config, source=directory)

    def _variant(self, max_length: int | None, stride: int = 0, strategy: str = "longest_first"):
        """A copy of the tokenizer configured once for these truncation settings; never mutated afterwards."""
        key = (max_length, stride, strategy)
        tok = self._variants.get(key)  # the common case takes no lock: a dict read is atomic
        if tok is not None:
            return tok
        # Built outside the lock: copying a large tokenizer takes a while and must not stall the other threads'
        # calls. Two threads may both build one; the first stored wins and both copies are identical.
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer.from_str(self._tok.to_str())
        tok.no_padding()
        if max_length is None:
            tok.no_truncation()
        else:
            tok.enable_truncation(max_length, stride=stride, strategy=strategy)
        with self._lock:
            tok = self._variants.setdefault(key, tok)
            # Callers choose the settings (question answering's max_seq_len and doc_stride), so the copies are
            # capped: the oldest goes first, never the base tokenizer. A thread still using it keeps its reference.
            while len(self._variants) > _MAX_VARIANTS:
                del self._variants[next(k for k in self._variants if k != self._base_key)]
        return tok

    def __call__(self, texts, pairs=None, *, truncation: bool = True, max_length: int | None = None,
                 add_special_tokens: bool = True, padding_side: str | None = None,
                 strategy: str = "longest_first") -> Batch:
        """``truncation``: True cuts to the model's maximum with a warning, False makes that an error, None applies no
        limit; ``strategy`` which text of a pair is cut (tokenizers' ``longest_first``, ``only_first``,
        ``only_second``). ``padding_side`` overrides tokenizer_config.json's (decoder-only generation pads on the
        left)."""
        texts = check_texts(texts)
        if pairs is not None:  # one text_pair (or None) per text
            pairs = [None if p is None else check_texts(p, what="text_pair")[0] for p in pairs]
            if len(pairs) != len(texts):
                raise InputError(f"Got {len(texts)} texts but {len(pairs)} text pairs; give one pair per text.")
        if truncation is None:  # no limit at all: the caller (text generation) fits the tokens itself
            encodings = self._variant(None).encode_batch(texts, add_special_tokens=add_special_tokens)
            return self._pad(encodings, [False] * len(encodings), padding_side)
        limit = min(max_length or self.max_length, self.max_length)
        tok = self._variant(limit if truncation else self.max_length, strategy=strategy)
        items = [t if p is None else (t, p) for t, p in zip(texts, pairs)] if pairs is not None else texts
        try:
            encodings = tok.encode_batch(items, add_special_tokens=add_special_tokens)
        except Exception as err:  # tokenizers: the text it may cut is too short to make the pair fit
            if strategy == "longest_first":
                raise
            kept = "second" if strategy == "only_first" else "first"
            raise InputError(f"A text pair does not fit the model's maximum of {limit} tokens even with its "
                             f"{strategy.removeprefix('only_')} text cut: its {kept} text alone is too long. "
                             "Shorten it.") from err
        truncated = [bool(e.overflowing) for e in encodings]
        if any(truncated):
            if not truncation:
                raise InputError(f"An input is longer than the model's maximum of {self.max_length} tokens. "
                                 "Shorten it or call with truncation=True.")
            log.warning("Truncated %d input(s) to %d tokens (the model's maximum).", sum(truncated), limit)
        return self._pad(encodings, truncated, padding_side)

    def windows(self, pairs: list[tuple[str, str]], *, max_length: int, stride: int, split: int = 1,
                names: tuple[str, str] = ("text", "text_pair")) -> Windows:
        """Encode text pairs; a pair longer than ``max_length`` tokens becomes several windows in which text ``split``
        (0 or 1) is cut into pieces overlapping by ``stride`` tokens and the other text is repeated whole, exactly as
        transformers' ``truncation="only_second"`` (or ``"only_first"``) with ``stride`` and overflowing tokens.
        ``names`` name the two texts in errors."""
        if max_length > self.max_length:
            raise InputError(f"max_length={max_length} is more than the model's maximum of {self.max_length} tokens.")
        for pair in pairs:
            for name, text in zip(names, pair):
                _check_encodable(text, name)
        whole = self._variant(None).encode_batch(pairs, add_special_tokens=True)
        long = [i for i, e in enumerate(whole) if len(e.ids) > max_length]
        for i in long:  # tokenizers fails (or panics) when the kept text leaves no room for windows: say why instead
            kept = sum(1 for s in whole[i].sequence_ids if s != split)  # the whole text plus special tokens
            if kept >= max_length:
                wider = f" or raise the window up to the model's maximum of {self.max_length}" \
                    if max_length < self.max_length else ""
                raise InputError(f"The {names[1 - split]} is {kept} tokens long with special tokens, which leaves no "
                                 f"room for the {names[split]} in a window of {max_length} tokens. Shorten the "
                                 f"{names[1 - split]}{wider}.")
            if max_length - kept <= stride:
                raise InputError(
                    f"The {names[1 - split]} takes {kept} of the {max_length} tokens of a window (with special "
                    f"tokens), leaving {max_length - kept} for the {names[split]}: windows need more than the "
                    f"overlap stride={stride}. Shorten the {names[1 - split]} or lower the stride.")
        strategy = "only_second" if split == 1 else "only_first"
        # Only the pairs that overflow are encoded again, now cut: the rest is identical either way.
        cut = iter(self._variant(max_length, stride, strategy).encode_batch([pairs[i] for i in long]) if long else [])
        encodings, example = [], []
        for i, e in enumerate(whole):
            if len(e.ids) > max_length:
                first = next(cut)
                parts = [first, *first.overflowing]
            else:
                parts = [e]
            encodings += parts
            example += [i] * len(parts)
        batch = self._pad(encodings, [len(whole[i].ids) > max_length for i in example])
        return Windows(**vars(batch), example=np.array(example, dtype=np.int64),
                       sequence_ids=[list(e.sequence_ids) for e in encodings],
                       word_ids=[list(e.word_ids) for e in encodings], padding_left=self.padding_side == "left")

    def _pad(self, encodings, truncated, padding_side: str | None = None) -> Batch:
        left = (padding_side or self.padding_side) == "left"
        B, T = len(encodings), max(len(e.ids) for e in encodings)
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, T), dtype=np.int64)
        types = np.zeros((B, T), dtype=np.int64)
        special = np.ones((B, T), dtype=np.int64)
        offsets = []
        for b, e in enumerate(encodings):
            n = len(e.ids)
            where = slice(T - n, T) if left else slice(0, n)
            ids[b, where], mask[b, where], types[b, where] = e.ids, e.attention_mask, e.type_ids
            special[b, where] = e.special_tokens_mask
            offsets.append([tuple(o) for o in e.offsets])
        return Batch(ids, mask, types, offsets, special, truncated)

    def decode(self, ids, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool | None = None) -> str:
        """``clean_up_tokenization_spaces=None`` follows tokenizer_config.json, as transformers' decode does."""
        text = self._tok.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)
        clean = clean_up_tokenization_spaces
        if clean is None:
            clean = self.clean_up_tokenization_spaces
        # transformers skips the clean-up for BPE models: it was written for WordPiece and eats real spaces in BPE text.
        if clean and type(self._tok.model).__name__ != "BPE":
            text = clean_up_tokenization(text)
        return text

    # The vocabulary: adding tokens and saving, as transformers' tokenizers do.

    def __len__(self) -> int:
        """The vocabulary size with added tokens: what ``model.resize_token_embeddings`` needs."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def add_tokens(self, tokens, special: bool = False) -> int:
        """Add tokens to the vocabulary, each encoded as one id from now on (after the last id), as transformers'
        ``tokenizer.add_tokens(tokens, special_tokens=special)``: special tokens match as written and are skipped by
        ``decode(skip_special_tokens=True)``; others are matched after normalization. Returns how many were added.
        A token already in the vocabulary is an error (it would silently keep its old id)."""
        from tokenizers import AddedToken

        tokens = [tokens] if isinstance(tokens, str) else list(tokens) if isinstance(tokens, (list, tuple)) else None
        if not tokens or not all(isinstance(t, str) and t for t in tokens):
            raise InputError("add_tokens takes a non-empty string or a list of them.")
        if len(set(tokens)) != len(tokens):
            raise InputError(f"add_tokens was given the same token twice: {sorted({t for t in tokens if tokens.count(t) > 1})}.")
        known = {t: self._tok.token_to_id(t) for t in tokens if self._tok.token_to_id(t) is not None}
        if known:
            shown = ", ".join(f"{t!r} (id {i})" for t, i in list(known.items())[:5])
            raise InputError(f"Already in the vocabulary: {shown}. Add only new tokens.")
        for text in tokens:
            _check_encodable(text, "token")
        added = [AddedToken(t, special=special, normalized=not special) for t in tokens]
        count = self._tok.add_special_tokens(added) if special else self._tok.add_tokens(added)
        with self._lock:  # the configured copies hold the old vocabulary
            self._variants = {self._base_key: self._tok}
        return count

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """tokenizer.json (with the added tokens) and tokenizer_config.json, plus the special-tokens map and chat
        template it was loaded with: what transformers' ``AutoTokenizer.from_pretrained`` and kiln read back."""
        import json
        import shutil

        from tokenizers import Tokenizer as HFTokenizer

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tok = HFTokenizer.from_str(self._tok.to_str())
        tok.no_truncation()  # kiln's own settings, not the checkpoint's
        tok.no_padding()
        config = {**self._config, "model_max_length": self._config.get("model_max_length", self.max_length)}
        config.pop("added_tokens_decoder", None)  # tokenizer.json lists every added token; an old list would be stale
        for name, text in (("tokenizer.json", tok.to_str()), ("tokenizer_config.json", json.dumps(config, indent=2,
                                                                                                  ensure_ascii=False))):
            staged = directory / f".{name}.tmp"
            staged.write_text(text + "\n", encoding="utf-8")
            os.replace(staged, directory / name)
        for name in ("special_tokens_map.json", "chat_template.jinja"):
            if self._source is not None and (self._source / name).is_file() and self._source != directory:
                shutil.copyfile(self._source / name, directory / name)
        return directory

    # Read-only views of the vocabulary and special tokens.

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, id_: int) -> str | None:
        return self._tok.id_to_token(int(id_))

    def encode_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        _check_encodable(text, "text")
        return self._tok.encode(text, add_special_tokens=False).ids

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join tokens into text with the tokenizer's decoder (``##`` pieces, byte-level ``Ġ``), as transformers
        does."""
        decoder = self._tok.decoder
        return decoder.decode(list(tokens)) if decoder is not None else " ".join(tokens)

    @property
    def continuing_subword_prefix(self) -> str | None:
        """``##`` for WordPiece; None (or "") where tokens do not mark word continuations."""
        return getattr(self._tok.model, "continuing_subword_prefix", None)

    @property
    def mask_token(self) -> str | None:
        return self.special_tokens.get("mask_token")

    @property
    def mask_token_id(self) -> int | None:
        return self.token_to_id(self.mask_token) if self.mask_token else None

    @property
    def unk_token_id(self) -> int | None:
        unk = self.special_tokens.get("unk_token") or getattr(self._tok.model, "unk_token", None)
        return self.token_to_id(unk) if unk else None


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: drop the spaces decoding puts before punctuation and contractions."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                     (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _special_tokens(directory: Path, config: dict) -> dict[str, str]:
    """Special tokens by role from tokenizer_config.json, else special_tokens_map.json (older checkpoints)."""
    sources = [config]
    map_path = directory / "special_tokens_map.json"
    if map_path.is_file():
        sources.append(read_json(map_path, "Restore it from the checkpoint."))
    found = {}
    for name in _SPECIAL:
        for source in sources:
            value = source.get(name)
            if isinstance(value, dict):  # AddedToken serialised
                value = value.get("content")
            if isinstance(value, str):
                found[name] = value
                break
    return found


def check_texts(texts, what: str = "input") -> list[str]:
    """A str or a non-empty list of str, else an InputError naming what is wrong."""
    if isinstance(texts, str):
        _check_encodable(texts, what)
        return [texts]
    if isinstance(texts, (bytes, bytearray)):
        raise InputError(f"The {what} is bytes; decode it to str first: data.decode('utf-8'), or "
                         "data.decode('utf-8', errors='replace') for bytes that may not be valid UTF-8.")
    if not isinstance(texts, (list, tuple)):
        raise InputError(f"The {what} must be a string or a list of strings, got {type(texts).__name__}.")
    if not texts:
        raise InputError(f"The {what} list is empty; give at least one string.")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"The {what} list must hold only strings; item {i} is {type(t).__name__}.")
        _check_encodable(t, what if len(texts) == 1 else f"{what} {i}")
    return list(texts)


def _check_encodable(text: str, what: str) -> None:
    """A str may hold lone surrogates ("\\ud800", from bytes decoded with errors="surrogateescape"), which are not
    Unicode text: tokenizers rejects them with a TypeError that does not say why. Say why."""
    if not isinstance(text, str) or text.isascii():  # non-strings are the type checks' business
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"The {what} is not valid Unicode: it holds the lone surrogate {text[err.start]!r} at "
                         f"character {err.start} (what decoding invalid UTF-8 bytes with errors='surrogateescape' "
                         "leaves). Decode the bytes with errors='replace', or clean the text with "
                         "text.encode('utf-8', 'replace').decode('utf-8').") from None
