"""The decode loop over a kiln decoder graph: prefill and decode in one graph, the KV cache left on the engine's side.

The graph takes ``past_key_values.{i}.key/value`` and returns ``present.{i}.key/value`` (past + new). Each step asks
the engine to ``keep`` the presents and feeds the handles it returns as the next step's pasts, so the cache never
round-trips through numpy (onnxruntime: OrtValues through one IO binding per thread; TensorRT: device buffers).
Graphs that take ``logits_to_keep`` compute and return the last position's logits only (the LM head of a prefill is
otherwise run for every prompt token). ``steps`` is the loop, a generator of each step's tokens; ``generate``
collects them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np

from kiln.errors import InputError
from kiln.runtime.generate.config import GenerationConfig
from kiln.runtime.generate.processors import process_logits, select_next
from kiln.runtime.generate.stopping import StopChecker


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """(B, T) positions of left-padded rows: each row's first real token is at position 0 (padding gets 0 too)."""
    return np.clip(np.asarray(attention_mask, dtype=np.int64).cumsum(-1) - 1, 0, None)


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
        # (batch, kv_heads, past_sequence, head_dim) per layer: a layer with pruned heads has fewer kv heads
        self._cache_shapes = {n: (int(infos[n].shape[1]), int(infos[n].shape[3]), np.dtype(infos[n].dtype))
                              for n in self.past_names}
        # Graphs exported since logits_to_keep (kiln.exporter.passes.logits) compute the LM head for the last
        # position only when asked: in a prefill that is most of the head's work and all but one row of its output.
        # One array for every step: onnxruntime binds it through one OrtValue made once per engine.
        self.keep_last = "logits_to_keep" in {i.name for i in engine.optional_inputs()}
        self._extra = {"logits_to_keep": np.array(1, dtype=np.int64)} if self.keep_last else {}
        self._extra.update(feed or {})

    def empty_cache(self, batch: int) -> dict:
        return {name: np.zeros((batch, heads, 0, dim), dtype=dtype)
                for name, (heads, dim, dtype) in self._cache_shapes.items()}

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: dict):
        """One forward pass. Returns (last-position logits (B, V) float32, the cache for the next step: engine
        handles, fed back as they are)."""
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                **self._extra, **cache}
        out = self.engine.run(feed, outputs=["logits"], keep=self.present_names)
        return out["logits"][:, -1].astype(np.float32), {p: out[q] for p, q in zip(self.past_names, self.present_names)}

    def release(self) -> None:
        """Drop what the calling thread's engine state still holds once a generation is over: the last step's
        inputs and outputs are the whole KV cache."""
        self.engine.release()


def steps(session: DecoderSession, input_ids: np.ndarray, attention_mask: np.ndarray, config: GenerationConfig,
          decode: Callable[[list[int]], str] | None = None) -> Iterator[np.ndarray]:
    """Yield each step's new tokens (B,) for left-padded prompts (B, T), up to ``config.max_new_tokens`` steps; rows
    that finished earlier get the pad token. ``decode`` turns ids into text, for ``config.stop_strings``.

    The engine state of a generation belongs to the thread that runs it: closing the generator (a consumer that
    stops reading) or exhausting it releases it, in its ``finally``."""
    B, _ = input_ids.shape
    rng = config.rng()
    stopper = StopChecker(config, batch=B, decode=decode)
    mask = attention_mask.astype(np.int64)
    generated = input_ids.astype(np.int64)
    step_ids, step_pos, cache = generated, position_ids(mask), session.empty_cache(B)
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
                step_ids, step_pos, cache = generated, position_ids(mask), session.empty_cache(B)
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
