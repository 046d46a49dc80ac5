"""When a row stops (EOS ids, stop strings, max_new_tokens), and incremental detokenization for streaming."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kiln.errors import InputError
from kiln.runtime.generate.config import GenerationConfig


class StreamDecoder:
    """Incremental detokenization that only emits complete text.

    Decodes a window of tokens starting one emission back (so a SentencePiece word keeps its leading space, which a
    decode starting at that token would strip) and emits what the window adds beyond its prefix, once the text does
    not end in U+FFFD: a byte-level BPE token may hold only part of a UTF-8 character. The same offsets scheme as
    text-generation-inference and vLLM; the concatenation of all pieces plus ``flush()`` equals a full decode."""

    def __init__(self, tokenizer_decode: Callable[[list[int]], str]):
        self._decode = tokenizer_decode
        self._tokens: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens before this have been emitted

    def push(self, token_id: int) -> str:
        self._tokens.append(int(token_id))
        prefix_text, text = self._window()
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._tokens)
        return text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD); later pushes start afresh."""
        prefix_text, text = self._window()
        self._prefix = self._read = len(self._tokens)
        return text[len(prefix_text):]

    def _window(self) -> tuple[str, str]:
        return self._decode(self._tokens[self._prefix:self._read]), self._decode(self._tokens[self._prefix:])


class StopChecker:
    """Per-row finished state over the new tokens: EOS ids, stop strings and max_new_tokens.

    A stop string ends a row as soon as it appears in the decoded text of the new tokens, even when it ends inside
    the last token ("st" + "opper" stops "stop"): transformers' StopStringCriteria matches exactly the stop strings
    that overlap the newest token, and checks after every token, which comes to the same. Unlike transformers, text of
    the prompt does not count towards a match. ``finish_reason[b]`` is "eos", "stop", "length" or None."""

    def __init__(self, config: GenerationConfig, batch: int, decode: Callable[[list[int]], str] | None = None):
        if config.stop_strings and decode is None:
            raise InputError("stop_strings need the tokenizer's decode function: pass decode= to StopChecker.")
        self.config = config
        self.eos_ids = config.eos_ids
        self.done = np.zeros(batch, dtype=bool)
        self.finish_reason: list[str | None] = [None] * batch
        self.steps = 0
        self._streams = [StreamDecoder(decode) for _ in range(batch)] if config.stop_strings else []
        self._texts = [""] * len(self._streams)
        # transformers pads finished rows with pad_token_id, falling back to the first EOS id
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else (self.eos_ids or (None,))[0]

    def fill(self, tokens: np.ndarray) -> np.ndarray:
        """Replace the next tokens of rows that finished earlier by the pad id (call before ``update``)."""
        if self.pad_id is None:
            return tokens
        return np.where(self.done, np.int64(self.pad_id), tokens)

    def update(self, tokens: np.ndarray) -> np.ndarray:
        """Record one new token per row; returns the (B,) finished mask (finished rows stay finished)."""
        self.steps += 1
        was_done = self.done.copy()
        tokens = np.asarray(tokens).reshape(-1)
        self._finish(np.flatnonzero(~was_done & np.isin(tokens, self.eos_ids)), "eos")
        for b, stream in enumerate(self._streams):
            if was_done[b]:
                continue
            before = len(self._texts[b])
            self._texts[b] += stream.push(int(tokens[b]))
            # only a match that ends in the text added now is new: search from len(stop) - 1 characters before it
            if any(s in self._texts[b][max(0, before - len(s) + 1):] for s in self.config.stop_strings):
                self._finish([b], "stop")
        if self.steps >= self.config.max_new_tokens:
            self._finish(np.flatnonzero(~self.done), "length")
        return self.done.copy()

    @property
    def all_done(self) -> bool:
        return bool(self.done.all())

    def _finish(self, rows, reason: str) -> None:
        for b in rows:
            if not self.done[b]:
                self.done[b], self.finish_reason[b] = True, reason
