"""Continuous batching: generation requests share decode steps. A request joins the running batch at the next step
(its prompt prefilled alone, its cache placed beside the others') and leaves when it stops, each row with its own
options, processors, random generator and stop rules, instead of waiting for the batch in flight.

The batch keeps kiln's left-padded layout: every row's cache has the same past length P, a row's real tokens at the
right end and its ``attention_mask`` zero over the padding. A row that joins with a longer context pads the others
on the left; rows leave by being cut out, and columns that are padding in every row are trimmed. The cache stays on
onnxruntime's side between changes of the batch (engine handles fed back); it is copied only when a row joins or
leaves. Each row's tokens are what a generation of that prompt alone gives (the rows do not see each other: the
mask keeps them apart), up to the arithmetic of a different batch size.

Not here: beam search, ``num_return_sequences`` > 1, prompt-lookup decoding, LongRoPE's recomputation and windowed
caches (Gemma's local layers): ``supports`` says which artifacts and options this loop takes; callers run the others
one request at a time.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from kiln.errors import ClosedError, InputError
from kiln.runtime.generate.config import GenerationConfig
from kiln.runtime.generate.loop import DecoderSession, position_ids
from kiln.runtime.generate.processors import process_logits, select_next
from kiln.runtime.generate.stopping import StopChecker

log = logging.getLogger("kiln")
_END = object()


def supports(session: DecoderSession, config: GenerationConfig | None = None) -> str | None:
    """Why this session (and these options) cannot be batched continuously, or None when it can."""
    if session.recompute_at is not None:
        return "LongRoPE's recomputation reruns a row's whole sequence"
    if session.windowed:
        return "its local layers keep a window-bounded cache"
    if config is not None:
        if config.num_beams > 1:
            return "beam search"
        if config.num_return_sequences > 1:
            return "num_return_sequences > 1"
        if config.prompt_lookup_num_tokens:
            return "prompt-lookup decoding"
    return None


@dataclass
class _Row:
    ids: np.ndarray  # (T,) the prompt
    config: GenerationConfig
    out: queue.Queue = field(default_factory=queue.Queue)  # new token ids, then _END (or an exception)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    rng: np.random.Generator | None = None
    stopper: StopChecker | None = None
    finish_reason: str | None = None


class Generation:
    """One request's tokens as they come (iterate), and why it stopped (``finish_reason``: "eos", "stop", "length").
    ``close()`` (or dropping out of a ``with`` block) leaves the batch at the next step."""

    def __init__(self, row: _Row):
        self._row = row

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._row.out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    @property
    def finish_reason(self) -> str | None:
        return self._row.finish_reason

    def close(self) -> None:
        self._row.cancelled.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ContinuousBatcher:
    """A worker thread that runs one decode loop for every request submitted (``submit``), at most ``max_batch``
    rows at a time (the rest wait, and join as rows leave)."""

    def __init__(self, session: DecoderSession, *, max_batch: int = 8, decode: Callable[[list[int]], str] | None = None,
                 start: bool = True):
        """``start=False``: requests queue until ``start()`` (a caller that submits several before the loop runs)."""
        why = supports(session)
        if why:
            raise InputError(f"This artifact cannot be batched continuously: {why}. Run its requests one at a time.")
        limit = session.max_batch
        self.max_batch = min(max_batch, limit) if limit else max_batch
        self.session, self.decode = session, decode
        self._waiting: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self.steps = 0  # decode steps run, and the rows they carried: how much requests shared
        self.rows_stepped = 0
        self._thread = threading.Thread(target=self._loop, name="kiln-continuous-batching", daemon=True)
        if start:
            self._thread.start()

    def start(self) -> None:
        if self._thread.ident is None:  # never started (a thread starts once)
            self._thread.start()

    def submit(self, input_ids, config: GenerationConfig) -> Generation:
        """Queue one prompt (token ids, special tokens included) for generation with ``config``."""
        if self._closed.is_set():
            raise ClosedError("The continuous batcher is closed.")
        why = supports(self.session, config)
        if why:
            raise InputError(f"Continuous batching does not take {why}; run this request on its own.")
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        if not len(ids):
            raise InputError("An empty prompt gives the model nothing to continue; give some text.")
        row = _Row(ids, config, rng=config.rng(), stopper=StopChecker(config, batch=1, decode=self.decode))
        self._waiting.put(row)
        return Generation(row)

    def close(self) -> None:
        self._closed.set()
        self._waiting.put(None)
        self.start()  # a loop never started still answers what was queued, then ends
        self._thread.join()

    # ------------------------------------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        rows: list[_Row] = []
        mask = np.zeros((0, 0), dtype=np.int64)
        cache = self.session.empty_cache(0)
        last = np.zeros(0, dtype=np.int64)  # each row's newest token: the next step's input
        try:
            while not self._closed.is_set() or rows:
                for row in [r for r in rows if r.cancelled.is_set()]:
                    row.finish_reason = row.finish_reason or "cancelled"
                    self._finish(row)
                keep = [i for i, r in enumerate(rows) if r.finish_reason is None]
                if len(keep) < len(rows):
                    rows, mask, cache, last = self._drop(rows, mask, cache, last, keep)
                joined = self._admit(rows, block=not rows)
                if joined is None:
                    break
                for row, (row_cache, token) in joined:
                    if row.finish_reason is None:  # a row that ended at its first token never joins
                        rows, mask, cache, last = self._join(rows, mask, cache, last, row, row_cache, token)
                if not rows:
                    continue
                positions = (mask.sum(axis=1, keepdims=True)).astype(np.int64)  # each row's next position
                mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
                logits, cache = self.session.step(last[:, None], mask, positions, cache)
                self.steps += 1
                self.rows_stepped += len(rows)
                for i, row in enumerate(rows):
                    if row.finish_reason is None:
                        last[i] = self._choose(row, logits[i:i + 1])
        except BaseException as err:  # noqa: BLE001 - every waiting caller gets the failure, not a hang
            log.exception("continuous batching failed")
            for row in rows:
                row.out.put(err)
            while not self._waiting.empty():
                row = self._waiting.get()
                if row is not None:
                    row.out.put(err)
        finally:
            self.session.release()

    def _admit(self, rows: list[_Row], block: bool):
        """Prefill waiting requests (each alone) while there is room: [(row, (its cache, its first token))], or None
        when closed."""
        joined = []
        while len(rows) + len(joined) < self.max_batch:
            try:
                row = self._waiting.get(block=block and not joined)
            except queue.Empty:
                break
            if row is None:
                if self._closed.is_set() and not rows and not joined:
                    return None
                continue
            if row.cancelled.is_set():
                row.finish_reason = "cancelled"
                row.out.put(_END)
                continue
            try:
                T = len(row.ids)
                ones = np.ones((1, T), dtype=np.int64)
                logits, row_cache = self.session.step(row.ids[None], ones, position_ids(ones), self.session.empty_cache(1))
                row_cache = {k: _array(v) for k, v in row_cache.items()}
                token = self._choose(row, logits)
            except Exception as err:  # noqa: BLE001 - this request fails alone
                row.out.put(err)
                continue
            joined.append((row, (row_cache, token)))
        return joined

    def _choose(self, row: _Row, logits: np.ndarray) -> int:
        generated = np.array([[*row.ids.tolist(), *row.generated]], dtype=np.int64)
        scores = process_logits(logits, generated, row.config, new_tokens=len(row.generated))
        token = int(select_next(scores, row.config, row.rng)[0])
        row.generated.append(token)
        done = bool(row.stopper.update(np.array([token]))[0])
        if not (done and row.stopper.finish_reason[0] == "eos"):
            row.out.put(token)
        if done:
            row.finish_reason = row.stopper.finish_reason[0]
            row.out.put(_END)
        return token

    def _finish(self, row: _Row) -> None:
        row.out.put(_END)

    def _join(self, rows, mask, cache, last, row, row_cache, token):
        """The batch with ``row`` added: everything left-padded to the longer of the two pasts."""
        cache = {k: _array(v) for k, v in cache.items()}
        P, T = mask.shape[1], len(row.ids)
        S = max(P, T)
        mask = np.concatenate([_pad_left(mask, S - P, axis=1), _pad_left(np.ones((1, T), np.int64), S - T, axis=1)])
        cache = {k: np.concatenate([_pad_left(cache[k], S - P, axis=2), _pad_left(row_cache[k], S - T, axis=2)])
                 for k in cache}
        return rows + [row], mask, cache, np.concatenate([last, [token]]).astype(np.int64)

    def _drop(self, rows, mask, cache, last, keep: list[int]):
        """The batch without the rows that finished, and without the columns that are now padding everywhere."""
        cache = {k: _array(v)[keep] for k, v in cache.items()}
        mask = mask[keep]
        if len(keep):
            start = int((mask != 0).argmax(axis=1).min())  # leading columns no remaining row uses
            mask = mask[:, start:]
            cache = {k: v[:, :, start:] for k, v in cache.items()}
        else:
            mask = np.zeros((0, 0), dtype=np.int64)
            cache = self.session.empty_cache(0)
        return [rows[i] for i in keep], mask, cache, last[keep]


def _array(value) -> np.ndarray:
    """An engine handle (OrtValue) or array as a numpy array."""
    return value if isinstance(value, np.ndarray) else value.numpy()


def _pad_left(array: np.ndarray, n: int, axis: int) -> np.ndarray:
    if n <= 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (n, 0)
    return np.pad(array, widths)
