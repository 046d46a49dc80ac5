"""Beam search over a decoder graph, as transformers' generate runs it (``_beam_search``, ``early_stopping=False``):
text decoders (the text-generation pipeline's ``num_beams``) and Whisper's decoder (its cross-attention keys/values
fed per beam) share it.

Every beam's next-token scores are log-probabilities, processed (the generic processors, then a model's own rules)
before its running score is added; the best 2 x ``num_beams`` continuations are kept, of which the best
``num_beams`` that do not end run on, and those that end among the first ``num_beams`` compete for the result by
score / new length ** ``length_penalty``; the search stops when no running beam can beat the worst finished one any
more (judged at the current length, transformers' heuristic with ``early_stopping=False``; at the longest length
with ``"never"`` and a positive ``length_penalty``), once ``num_beams`` have finished with ``early_stopping=True``, or
at ``max_new_tokens``. The self-attention cache is reordered after every step to follow each kept beam's parent.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kiln.errors import InputError
from kiln.runtime.generate.config import GenerationConfig
from kiln.runtime.generate.loop import DecoderSession, position_ids
from kiln.runtime.generate.processors import process_logits

NEG = np.float32(-1e9)  # transformers' stand-in for a score that can never win


def beam_search(session: DecoderSession, input_ids: np.ndarray, attention_mask: np.ndarray, config: GenerationConfig,
                num_beams: int, length_penalty: float = 1.0, feed: dict | None = None,
                rules: Callable[[np.ndarray, np.ndarray, int], np.ndarray] | None = None,
                early_stopping: bool | str = False, num_return_sequences: int = 1) -> list[list[int]]:
    """Each row's best ``num_return_sequences`` sequences of new tokens (row after row, best first, as transformers
    returns them), without their end token, for left-padded prompts ``input_ids`` (B, P)
    with their ``attention_mask``. ``feed``: per-row inputs of the graph besides the cache (Whisper's
    cross-attention keys/values, numpy, batch first), repeated for every beam. ``rules(scores, sequences,
    prompt_length)``: a model's own processors over (B * beams, V) scores (Whisper's), after the generic ones.
    ``num_beams`` and ``length_penalty`` are checked with the rest of ``config`` (``GenerationConfig.validate``)."""
    B, P = input_ids.shape
    K, eos = num_beams, np.array(config.eos_ids or [-1], dtype=np.int64)
    limit = session.max_batch
    if limit is not None and B * K > limit:  # every beam is a row of the graph's batch: as many prompts as fit
        if K > limit:
            raise InputError(f"num_beams={K} runs {K} rows at once, but this artifact takes batches of at most "
                             f"{limit}: use num_beams <= {limit}, or re-export with --batch 1:{K * B}.")
        step = limit // K
        return [row for start in range(0, B, step)
                for row in beam_search(session, input_ids[start:start + step], attention_mask[start:start + step],
                                       config, num_beams, length_penalty,
                                       {k: v[start:start + step] for k, v in (feed or {}).items()}, rules,
                                       early_stopping, num_return_sequences)]
    max_length = P + config.max_new_tokens
    if session.recompute_at is not None and max_length > session.recompute_at:
        raise InputError(f"num_beams > 1 over {session.recompute_at} tokens: this model switches its rotary factors "
                         "there (LongRoPE) by rerunning the sequence, which kiln's beam search does not do yet. Use "
                         "num_beams=1, or fewer new tokens.")
    fill = int(eos[0]) if eos[0] >= 0 else (config.pad_token_id or 0)
    running = np.full((B, K, max_length), fill, dtype=np.int64)
    running[:, :, :P] = np.asarray(input_ids, dtype=np.int64)[:, None, :]
    prompt_mask = np.repeat(np.asarray(attention_mask, dtype=np.int64), K, axis=0)  # (B * K, P)
    finished_seqs = running.copy()
    running_scores = np.zeros((B, K), dtype=np.float32)
    running_scores[:, 1:] = NEG  # the beams start as copies: only the first may be extended at first
    finished_scores = np.full((B, K), NEG, dtype=np.float32)
    finished = np.zeros((B, K), dtype=bool)
    improvable = np.ones((B, 1), dtype=bool)
    first_k = np.arange(2 * K) < K  # only the first num_beams candidates may finish
    rows = np.arange(B)[:, None]
    feed = {name: np.ascontiguousarray(np.repeat(value, K, axis=0)) for name, value in (feed or {}).items()}
    cache = session.empty_cache(B * K)
    step_ids = running[:, :, :P].reshape(B * K, P)
    positions = position_ids(prompt_mask)
    outputs = ["logits", *session.present_names]
    cur = P
    try:
        while True:
            mask = np.concatenate([prompt_mask, np.ones((B * K, cur - P), dtype=np.int64)], axis=1)
            out = session.forward(step_ids, mask, positions, {**cache, **feed}, outputs)
            logits = out["logits"][:, -1].astype(np.float32)
            shifted = logits - logits.max(axis=-1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
            flat = running[:, :, :cur].reshape(B * K, cur)
            own = None if rules is None else (lambda s: rules(s, flat, P))
            log_probs = process_logits(log_probs, flat, config, attention_mask=mask, new_tokens=cur - P, rules=own)
            V = log_probs.shape[-1]
            totals = (log_probs.reshape(B, K, V) + running_scores[:, :, None]).reshape(B, K * V)
            best = np.argsort(-totals, axis=1, kind="stable")[:, :2 * K]  # (B, 2K), best first
            best_scores = np.take_along_axis(totals, best, axis=1)
            origin, ids = best // V, best % V
            candidates = running[rows, origin].copy()  # (B, 2K, max_length)
            candidates[:, :, cur] = ids
            hits = np.isin(ids, eos) | (cur + 1 >= max_length)
            # the best num_beams candidates that do not end run on
            open_scores = best_scores + hits * NEG
            keep = np.argsort(-open_scores, axis=1, kind="stable")[:, :K]
            running = np.take_along_axis(candidates, keep[:, :, None], axis=1)
            running_scores = np.take_along_axis(open_scores, keep, axis=1)
            parents = np.take_along_axis(origin, keep, axis=1)
            # those that end among the first num_beams compete with the ones finished before
            just = hits & first_k[None, :]
            scored = best_scores / np.float32((cur + 1 - P) ** length_penalty)
            scored = scored + (~improvable) * NEG + (~just) * NEG
            merged_scores = np.concatenate([finished_scores, scored], axis=1)
            pick = np.argsort(-merged_scores, axis=1, kind="stable")[:, :K]
            finished_seqs = np.take_along_axis(np.concatenate([finished_seqs, candidates], axis=1),
                                               pick[:, :, None], axis=1)
            finished_scores = np.take_along_axis(merged_scores, pick, axis=1)
            finished = np.take_along_axis(np.concatenate([finished, just], axis=1), pick, axis=1)
            flat_parents = (parents + np.arange(B)[:, None] * K).reshape(-1)
            cache = {past: out[present][flat_parents] for past, present in zip(session.past_names, session.present_names)}
            cur += 1
            longest = max_length if early_stopping == "never" and length_penalty > 0 else cur
            best_possible = running_scores[:, :1] / np.float32((longest - P) ** length_penalty)
            worst = np.where(finished, finished_scores.min(axis=1, keepdims=True), NEG)
            improvable = improvable & (best_possible > worst).any(axis=-1, keepdims=True)
            if not improvable.any() or hits.all() or (early_stopping is True and finished.all()):
                break
            step_ids = running[:, :, cur - 1].reshape(B * K, 1)
            positions = positions[:, -1:] + 1
    finally:
        session.release()
    results = []
    for row in finished_seqs[:, :num_return_sequences, P:].reshape(-1, max_length - P).tolist():
        end = next((i for i, token in enumerate(row) if token in eos), len(row))
        results.append(row[:end])
    return results
