"""The decode loop over a kiln decoder graph: prefill and decode in one graph, the KV cache left on the engine's side.

The graph takes ``past_key_values.{i}.key/value`` and returns ``present.{i}.key/value`` (past + new). Each step asks
the engine to ``keep`` the presents and feeds the handles it returns as the next step's pasts, so the cache never
round-trips through numpy (onnxruntime: OrtValues through one IO binding per thread; TensorRT: device buffers).
Graphs that take ``logits_to_keep`` compute and return the last position's logits only (the LM head of a prefill is
otherwise run for every prompt token). ``steps`` is the loop, a generator of each step's tokens; ``generate``
collects them.

Graphs exported with the cache written in place (kiln.json ``attention.cache: in-place``; their past axis is
``cache_capacity``) take a buffer of any capacity as the past and write the step's keys and values into it after the
first ``total_sequence - sequence`` positions: the session binds one buffer per layer as both past and present, and
the cache it hands callers is a view of the filled positions, so callers slice, gather and concatenate it as the
concatenated cache of other graphs. A view still backed by a buffer with room is written in place; anything else
(a gathered or concatenated cache, or a full buffer) is copied into a new buffer with ``HEADROOM`` free positions:
its room is kept small rather than ``max_new_tokens`` (memory; the kernel reads only the filled positions). Long
prompts are prefilled ``PREFILL_CHUNK`` tokens at a time, which bounds the attention scores' memory and time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np

from kiln.errors import InputError
from kiln.runtime.engines.base import cache_buffer
from kiln.runtime.generate.config import GenerationConfig
from kiln.runtime.generate.processors import process_logits, select_next
from kiln.runtime.generate.stopping import StopChecker


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """(B, T) positions of left-padded rows: each row's first real token is at position 0 (padding gets 0 too)."""
    return np.clip(np.asarray(attention_mask, dtype=np.int64).cumsum(-1) - 1, 0, None)


HEADROOM = 128  # free positions of a new cache buffer: a step attends over them all, and a full one is copied
PREFILL_CHUNK = 256  # prompt tokens per pass of an in-place graph's prefill (benchmarks/RESULTS.md)


class DecoderSession:
    """A decoder graph's names and shapes over an engine, and one forward step. Holds no per-call state, so one
    session serves many threads; what a step leaves on the engine's side is dropped by ``release``."""

    def __init__(self, engine, feed: dict | None = None, recompute_at: int | None = None):
        """``feed``: inputs fed unchanged at every step (an optional ``head_mask``). ``recompute_at``: kiln.json's
        ``decoder.recompute_cache_at`` (LongRoPE models): when a row first reaches that many tokens + 1, the step
        drops the cache and runs the whole sequence, as transformers' generate does for Phi-3, so that every key of
        that row is rotated with the long factors from then on (the graph picks the factors per row; the rows that
        have not passed it keep theirs, so each row gets what it would get alone)."""
        self.engine, self.recompute_at = engine, recompute_at
        infos = {i.name: i for i in engine.inputs()}
        self.past_names = [n for n in infos if n.startswith("past_key_values.")]
        if not self.past_names or "position_ids" not in infos:
            raise InputError("This artifact is not a kiln decoder (no past_key_values inputs); export it with "
                             "--task text-generation.")
        self.present_names = ["present." + n.removeprefix("past_key_values.") for n in self.past_names]
        self._present_of = dict(zip(self.past_names, self.present_names))
        # layers whose cache a sliding window bounds (Gemma's local layers): their own past axis
        self.windowed = [n for n in self.past_names if infos[n].shape[2] == "past_window"]
        # layers whose cache the graph writes in place into a buffer (the rest concatenate: Gemma's local layers)
        self.buffered = [n for n in self.past_names if infos[n].shape[2] == "cache_capacity"]
        self.in_place = len(self.buffered) == len(self.past_names)
        # (batch, kv_heads, past_sequence, head_dim) per layer: a layer with pruned heads has fewer kv heads
        self._cache_shapes = {n: (int(infos[n].shape[1]), int(infos[n].shape[3]), np.dtype(infos[n].dtype))
                              for n in self.past_names}
        # Graphs exported since logits_to_keep (kiln.exporter.passes.logits) compute the LM head for the last
        # position only when asked: in a prefill that is most of the head's work and all but one row of its output.
        # One array for every step: onnxruntime binds it through one OrtValue made once per engine.
        self.keep_last = "logits_to_keep" in {i.name for i in engine.optional_inputs()}
        self._extra = {"logits_to_keep": np.array(1, dtype=np.int64)} if self.keep_last else {}
        self._extra.update(feed or {})

    def empty_cache(self, batch: int, capacity: int = 0) -> dict:
        """A cache of no positions for ``batch`` rows; for an in-place graph, backed by buffers of ``capacity``
        positions (the prompt and the new tokens: written in place until full)."""
        return {name: np.zeros((batch, heads, capacity if name in self.buffered else 0, dim), dtype=dtype)[:, :, :0]
                for name, (heads, dim, dtype) in self._cache_shapes.items()}

    @property
    def max_batch(self) -> int | None:
        """The most rows the graph was exported for (its ``batch`` axis), or None when the engine does not say."""
        return ((getattr(self.engine, "axes", None) or {}).get("batch") or {}).get("max")

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: dict,
                outputs: list[str], keep=(), **extra) -> dict:
        """One pass of the graph with the session's fixed inputs (``logits_to_keep``, ``head_mask``), ``extra``
        overriding them; ``cache`` holds the pasts (and any other per-call input, Whisper's cross keys/values).
        Returns the engine's ``outputs`` (``keep``: as engine handles)."""
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                **self._extra, **extra, **cache}
        if not self.buffered:
            return self.engine.run(feed, outputs=outputs, keep=keep)
        total = np.shape(attention_mask)[1]
        into = self._buffers(feed, total - np.shape(input_ids)[1], total)
        out = self.engine.run(feed, outputs=outputs, keep=[k for k in keep if k not in into], into=into)
        for present in into:  # the filled positions
            out[present] = out[present][:, :, :total]
        return out

    def _buffers(self, feed: dict, past: int, total: int) -> dict:
        """In-place graphs: each past in ``feed`` replaced by a buffer with room for ``total`` positions (the one
        behind it, or a new one holding a copy); returns {present: its buffer}."""
        into = {}
        for name in self.buffered:
            cache = feed[name]
            if isinstance(cache, np.ndarray) and cache.ndim == 4 and cache.shape[2] != past:
                raise InputError(f"The cache holds {cache.shape[2]} positions, but attention_mask says {past} came "
                                 "before these tokens: feed the mask of the whole sequence so far.")
            buffer = _buffer_behind(cache, total)
            feed[name] = into[self._present_of[name]] = cache_buffer(cache, total + HEADROOM) if buffer is None \
                else buffer
        return into

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: dict):
        """One forward pass. Returns (last-position logits (B, V) float32, the cache for the next step: engine
        handles, fed back as they are). An in-place graph takes a long prompt ``PREFILL_CHUNK`` tokens a pass."""
        keep = self.present_names
        length = input_ids.shape[1]
        if self.in_place and self.keep_last and length > PREFILL_CHUNK:
            past = attention_mask.shape[1] - length
            for start in range(0, length - PREFILL_CHUNK, PREFILL_CHUNK):
                end = start + PREFILL_CHUNK
                out = self.forward(input_ids[:, start:end], attention_mask[:, :past + end],
                                   position_ids[:, start:end], cache, ["logits"], keep=keep)
                cache = {p: out[q] for p, q in zip(self.past_names, self.present_names)}
            input_ids, position_ids = input_ids[:, end:], position_ids[:, end:]
        out = self.forward(input_ids, attention_mask, position_ids, cache, ["logits"], keep=keep)
        return out["logits"][:, -1].astype(np.float32), {p: out[q] for p, q in zip(self.past_names, self.present_names)}

    def release(self) -> None:
        """Drop what the calling thread's engine state still holds once a generation is over: the last step's
        inputs and outputs are the whole KV cache."""
        self.engine.release()


def _buffer_behind(cache, total: int) -> np.ndarray | None:
    """The C-contiguous (B, H, capacity, D) buffer that ``cache`` is the first positions of, if it has room for
    ``total`` positions; else None."""
    base = getattr(cache, "base", None)
    if not isinstance(base, np.ndarray) or base.ndim != 4 or not base.flags.c_contiguous or base.shape[2] < total:
        return None
    same = base.shape[:2] == cache.shape[:2] and base.shape[3] == cache.shape[3] and base.dtype == cache.dtype
    return base if same and cache.ctypes.data == base.ctypes.data else None


def steps(session: DecoderSession, input_ids: np.ndarray, attention_mask: np.ndarray, config: GenerationConfig,
          decode: Callable[[list[int]], str] | None = None) -> Iterator[np.ndarray]:
    """Yield each step's new tokens (B,) for left-padded prompts (B, T), up to ``config.max_new_tokens`` steps; rows
    that finished earlier get the pad token. ``decode`` turns ids into text, for ``config.stop_strings``.

    The engine state of a generation belongs to the thread that runs it: closing the generator (a consumer that
    stops reading) or exhausting it releases it, in its ``finally``."""
    if config.prompt_lookup_num_tokens:
        yield from lookup_steps(session, input_ids, attention_mask, config, decode)
        return
    B, _ = input_ids.shape
    rng = config.rng()
    stopper = StopChecker(config, batch=B, decode=decode)
    mask = attention_mask.astype(np.int64)
    generated = input_ids.astype(np.int64)
    # the buffers' room: a long max_new_tokens is not reserved up front (they grow by HEADROOM when full)
    capacity = input_ids.shape[1] + min(config.max_new_tokens, HEADROOM)
    step_ids, step_pos, cache = generated, position_ids(mask), session.empty_cache(B, capacity)
    try:
        for new_tokens in range(config.max_new_tokens):
            logits, cache = session.step(step_ids, mask, step_pos, cache)
            scores = process_logits(logits, generated, config, attention_mask=mask, new_tokens=new_tokens)
            tokens = stopper.fill(select_next(scores, config, rng))  # finished rows only pad
            generated = np.concatenate([generated, tokens[:, None]], axis=1)
            done = stopper.update(tokens).all()
            yield tokens
            if done:
                break
            step_ids, step_pos = tokens[:, None], step_pos[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)
            if session.recompute_at is not None and (mask.sum(axis=1) == session.recompute_at + 1).any():
                session.release()  # a row just passed the original context: the whole batch again, no cache
                step_ids, step_pos = generated, position_ids(mask)
                cache = session.empty_cache(B, generated.shape[1] + HEADROOM)
    finally:
        session.release()


def lookup_candidates(sequence: list[int], tokens: int, ngram: int) -> list[int]:
    """Prompt lookup's guess at what comes next, as transformers' ``PromptLookupCandidateGenerator``: the last n tokens
    (n from ``ngram`` down to 1) are looked for in the sequence, left to right; the first earlier match gives the up to
    ``tokens`` tokens that followed it there."""
    length = len(sequence)
    for n in range(min(ngram, length - 1), 0, -1):
        tail = sequence[-n:]
        for start in range(length - n):
            if sequence[start:start + n] == tail:
                return sequence[start + n:min(start + n + tokens, length)]
    return []


def lookup_steps(session: DecoderSession, input_ids: np.ndarray, attention_mask: np.ndarray, config: GenerationConfig,
                 decode: Callable[[list[int]], str] | None = None) -> Iterator[np.ndarray]:
    """``steps`` with prompt-lookup decoding (transformers' ``prompt_lookup_num_tokens``): each forward pass feeds the
    last token and candidates copied from where the text's last n-gram occurred before (``lookup_candidates``), and
    keeps every candidate that greedy decoding (the processors included, position by position) would have chosen, plus
    the token after them; the cache of the rejected ones is cut off. The tokens are greedy's, yielded one at a time;
    text that repeats what came before (extraction, editing, code) takes fewer passes. One prompt at a time, as
    transformers' assisted generation."""
    if input_ids.shape[0] != 1 or not np.asarray(attention_mask).all():
        raise InputError("prompt_lookup_num_tokens decodes one prompt at a time (as transformers' assisted "
                         "generation does); pass one prompt, or leave prompt_lookup_num_tokens out for a batch.")
    if any("past_window" in map(str, info.shape) for info in session.engine.inputs()):
        raise InputError("prompt_lookup_num_tokens needs a cache it can cut back, and this model's local layers keep "
                         "a window-bounded one (Gemma); decode without prompt_lookup_num_tokens.")
    if session.recompute_at is not None and input_ids.shape[1] + config.max_new_tokens > session.recompute_at:
        raise InputError(f"prompt_lookup_num_tokens over {session.recompute_at} tokens: this model reruns the "
                         "sequence there (LongRoPE), which prompt lookup does not do; use fewer new tokens.")
    stopper = StopChecker(config, batch=1, decode=decode)
    ngram = config.max_matching_ngram_size or 2
    sequence = [int(t) for t in input_ids[0]]
    capacity = len(sequence) + min(config.max_new_tokens, HEADROOM)
    pending, cache, new = list(sequence), session.empty_cache(1, capacity), 0
    outputs = ["logits", *session.present_names]
    try:
        while new < config.max_new_tokens:
            room = config.max_new_tokens - new - 1  # the pass adds one token besides the accepted candidates
            candidates = lookup_candidates(sequence, config.prompt_lookup_num_tokens, ngram)[:room]
            ids = np.array([pending + candidates], dtype=np.int64)
            past = len(sequence) - len(pending)
            keep_logits = {"logits_to_keep": np.array(len(candidates) + 1, dtype=np.int64)} if session.keep_last else {}
            out = session.forward(ids, np.ones((1, past + ids.shape[1]), dtype=np.int64),
                                  np.arange(past, past + ids.shape[1], dtype=np.int64)[None], cache, outputs,
                                  **keep_logits)
            rows = out["logits"][0, -(len(candidates) + 1):].astype(np.float32)
            accepted = 0
            for j, row in enumerate(rows):
                scores = process_logits(row[None], np.array([sequence], dtype=np.int64), config, new_tokens=new)
                token = int(scores[0].argmax())
                sequence.append(token)
                new += 1
                done = stopper.update(np.array([token], dtype=np.int64)).all()
                yield np.array([token], dtype=np.int64)
                if done or new >= config.max_new_tokens:
                    return
                if j == len(candidates) or token != candidates[j]:
                    break
                accepted += 1
            keep = past + len(pending) + accepted  # the cache holds the fed tokens up to the last accepted one
            # a view of an in-place graph's buffer (the rejected positions are written over next); else a copy
            cut = (lambda c: c) if session.in_place else np.ascontiguousarray
            cache = {p: cut(out[q][:, :, :keep]) for p, q in zip(session.past_names, session.present_names)}
            pending = [sequence[-1]]
    finally:
        session.release()


def generate(session: DecoderSession, input_ids: np.ndarray, attention_mask: np.ndarray, config: GenerationConfig,
             decode: Callable[[list[int]], str] | None = None,
             on_tokens: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """The new tokens (B, N) of ``steps``, rows that finished early filled with the pad token. ``on_tokens`` sees
    each step's tokens (B,) as they come (the benchmarks time steps with it)."""
    new_tokens = []
    # closing: a callback that raises must not leave the loop, and the cache it holds, to the garbage collector
    with contextlib.closing(steps(session, input_ids, attention_mask, config, decode=decode)) as loop:
        for tokens in loop:
            new_tokens.append(tokens)
            if on_tokens is not None:
                on_tokens(tokens)
    return np.stack(new_tokens, axis=1) if new_tokens else np.zeros((input_ids.shape[0], 0), dtype=np.int64)
