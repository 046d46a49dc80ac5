"""The decode loop over a kiln decoder graph: prefill and decode in one graph, the KV cache fed back in place.

The graph takes ``past_key_values.{i}.key/value`` and returns ``present.{i}.key/value`` (past + new). With
onnxruntime the presents stay OrtValues bound as the next step's pasts (IO binding), so the cache never round-trips
through numpy, and graphs that take ``logits_to_keep`` compute and return the last position's logits only (the
LM head of a prefill is otherwise run for every prompt token). Sampling and stopping are in ``generation.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from kiln.errors import InputError
from kiln.runtime.generation import GenerationConfig, StopChecker, process_logits, select_next


class DecoderSession:
    """Wraps an engine whose graph has the decoder inputs/outputs of ``kiln.exporter.decoder``."""

    def __init__(self, engine):
        self.engine = engine
        infos = {i.name: i for i in engine.inputs()}
        self.past_names = [n for n in infos if n.startswith("past_key_values.")]
        if not self.past_names or "position_ids" not in infos:
            raise InputError("This artifact is not a kiln decoder (no past_key_values inputs); export it with "
                             "--task text-generation.")
        self.present_names = ["present." + n.removeprefix("past_key_values.") for n in self.past_names]
        shape = infos[self.past_names[0]].shape  # (batch, kv_heads, past_sequence, head_dim)
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.dtype = np.dtype(infos[self.past_names[0]].dtype)
        # IO binding objects hold per-call state: one per thread, so a pipeline can serve several threads at once.
        self.io_binding = getattr(engine, "session", None) is not None
        # Graphs exported since logits_to_keep (kiln.exporter.passes.logits) compute the LM head for the last
        # position only when asked: in a prefill that is most of the head's work and all but one row of its output.
        self.keep_last = self.io_binding and any(
            i.name == "logits_to_keep" for i in engine.session.get_overridable_initializers())
        self._keep_one = None
        if self.keep_last:  # one read-only value, bound by every step of every thread
            import onnxruntime as ort

            self._keep_one = ort.OrtValue.ortvalue_from_numpy(np.array(1, dtype=np.int64))
        self._local = threading.local()

    def empty_cache(self, batch: int) -> dict:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
        return {name: empty for name in self.past_names}

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: dict):
        """One forward pass. Returns (last-position logits (B, V) float32, the cache for the next step)."""
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if hasattr(self.engine, "run_device"):  # TensorRT: the presents stay on the GPU as the next step's pasts
            out = self.engine.run_device({**feed, **cache}, keep=self.present_names)
            cache = {p: out[q] for p, q in zip(self.past_names, self.present_names)}
            return out["logits"][:, -1].astype(np.float32), cache
        if not self.io_binding:  # engines without IO binding: plain arrays in and out
            out = self.engine.run({**feed, **cache})
            return out["logits"][:, -1].astype(np.float32), {p: out[q] for p, q in zip(self.past_names, self.present_names)}
        import onnxruntime as ort

        binding = getattr(self._local, "binding", None)
        if binding is None:
            binding = self._local.binding = self.engine.session.io_binding()
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, value in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=np.int64))
        if self.keep_last:  # bind_cpu_input looks for a graph input of that name; an OrtValue binds an initializer
            binding.bind_ortvalue_input("logits_to_keep", self._keep_one)
        for name, value in cache.items():
            binding.bind_ortvalue_input(name, value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(value))
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, "cpu")
        self.engine.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # OrtValues in bind order: logits, then presents
        logits = outputs[0].numpy()[:, -1].astype(np.float32)
        return logits, dict(zip(self.past_names, outputs[1:]))

    def release(self) -> None:
        """Drop what this thread's IO binding still holds once a generation is over: its last inputs and outputs are
        the whole KV cache, which would otherwise stay alive in every thread that ever generated."""
        binding = getattr(self._local, "binding", None)
        if binding is not None:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()


def generate(session: DecoderSession, input_ids: np.ndarray, attention_mask: np.ndarray, config: GenerationConfig,
             decode: Callable[[list[int]], str] | None = None, on_tokens: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """Generate up to ``config.max_new_tokens`` for left-padded prompts (B, T). Returns the new tokens (B, N), rows
    that finished early filled with the pad token. ``on_tokens`` sees each step's tokens (B,) as they come."""
    B, T = input_ids.shape
    rng = np.random.default_rng(config.seed)
    stopper = StopChecker(config, batch=B, decode=decode)
    mask = attention_mask.astype(np.int64)
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)  # left-padded rows start at position 0
    generated, new_tokens = input_ids.astype(np.int64), []
    step_ids, step_pos, cache = generated, positions, session.empty_cache(B)
    try:
        for _ in range(config.max_new_tokens):
            logits, cache = session.step(step_ids, mask, step_pos, cache)
            scores = process_logits(logits, generated, config, attention_mask=mask)
            tokens = stopper.fill(select_next(scores, config, rng))  # finished rows only pad
            new_tokens.append(tokens)
            generated = np.concatenate([generated, tokens[:, None]], axis=1)
            if on_tokens is not None:
                on_tokens(tokens)
            if stopper.update(tokens).all():
                break
            step_ids, step_pos = tokens[:, None], step_pos[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)
    finally:
        session.release()
    return np.stack(new_tokens, axis=1) if new_tokens else np.zeros((B, 0), dtype=np.int64)
