"""Logits processors and token selection, each following what transformers' ``generate`` does for the same options,
so that a kiln artifact and the PyTorch model pick the same tokens under greedy decoding: repetition penalty, repeated
n-grams and the minimum of new tokens always, then (only when sampling) temperature, top-k, top-p, in that order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kiln.runtime.generate.config import GenerationConfig
from kiln.runtime.scores import softmax


# Each takes and returns (B, V) float32 scores, like transformers' LogitsProcessor.__call__(input_ids, scores).

def penalize_repetition(scores: np.ndarray, generated: np.ndarray, penalty: float,
                       ignore: np.ndarray | None = None) -> np.ndarray:
    """Divide positive and multiply negative scores of every token already in ``generated`` (prompt included).

    ``ignore`` (B,) is the number of leading positions per row not to count (left padding), transformers'
    ``prompt_ignore_length``. Ids outside the vocabulary are skipped: the model cannot produce them anyway."""
    B, V = scores.shape
    ids = np.minimum(generated, V)  # (B, N); V is the drop slot
    if ignore is not None:
        ids = np.where(np.arange(ids.shape[1])[None, :] < np.asarray(ignore)[:, None], V, ids)
    seen = np.zeros((B, V + 1), dtype=bool)
    seen[np.arange(B)[:, None], ids] = True
    penalized = np.where(scores < 0, scores * np.float32(penalty), scores / np.float32(penalty))
    return np.where(seen[:, :V], penalized, scores).astype(np.float32)


def ban_repeated_ngrams(scores: np.ndarray, generated: np.ndarray, n: int,
                        ignore: np.ndarray | None = None) -> np.ndarray:
    """transformers' ``no_repeat_ngram_size``: a token that would complete an n-gram already in the row (prompt
    included) gets -inf. ``ignore`` (B,): leading positions per row that are left padding, left out, so that a row
    in a batch gets what it would alone (transformers' batches count the padding too)."""
    B, N = generated.shape
    out = scores
    for b in range(B):
        row = generated[b, 0 if ignore is None else int(ignore[b]):].tolist()
        if len(row) + 1 < n:
            continue
        prefix = tuple(row[len(row) - n + 1:])  # the last n - 1 tokens: the n-gram the next token would complete
        banned = [row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i:i + n - 1]) == prefix]
        banned = [t for t in banned if 0 <= t < scores.shape[1]]
        if banned:
            out = out.copy() if out is scores else out
            out[b, banned] = -np.inf
    return out


def hold_back_eos(scores: np.ndarray, eos_ids: tuple[int, ...]) -> np.ndarray:
    """``min_new_tokens`` not reached yet: no end-of-sequence token may be picked."""
    out = scores.copy()
    out[:, [i for i in eos_ids if i < scores.shape[1]]] = -np.inf
    return out


def scale_temperature(scores: np.ndarray, value: float) -> np.ndarray:
    return (scores / np.float32(value)).astype(np.float32)


def filter_top_k(scores: np.ndarray, k: int, min_tokens_to_keep: int = 1) -> np.ndarray:
    """Keep the k highest scores; ties with the k-th are kept too (transformers compares with ``<``)."""
    k = min(max(k, min_tokens_to_keep), scores.shape[-1])
    kth = np.partition(scores, -k, axis=-1)[:, -k, None]  # (B, 1) the k-th largest
    return np.where(scores < kth, np.float32(-np.inf), scores)


def filter_top_p(scores: np.ndarray, p: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probabilities sum to >= p.

    As transformers: sort ascending, drop tokens whose cumulative probability is <= 1 - p, in float32."""
    order = np.argsort(scores, axis=-1, kind="stable")  # (B, V) ascending
    cumulative = np.cumsum(softmax(np.take_along_axis(scores, order, axis=-1)), axis=-1)
    remove_sorted = cumulative <= np.float32(1 - p)
    remove_sorted[:, -min_tokens_to_keep:] = False
    remove = np.empty_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, np.float32(-np.inf), scores)


def process_logits(logits: np.ndarray, generated: np.ndarray, config: GenerationConfig,
                   attention_mask: np.ndarray | None = None, new_tokens: int = 0,
                   rules: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """(B, V) last-position logits -> processed scores, in the order of transformers' ``_get_logits_processor``.

    ``generated`` (B, N) holds prompt + new ids; ``new_tokens`` how many of them are new. ``attention_mask`` (B, N),
    when given, marks left padding: the positions before each row's first 1 are not penalized (transformers derives
    the same from the prompt's mask). ``rules``: a model's own processors (Whisper's), which transformers runs after
    the generic ones and before sampling's warpers."""
    scores = np.asarray(logits, dtype=np.float32)  # transformers casts logits to float32 before processing
    ignore = None if attention_mask is None else (np.asarray(attention_mask) != 0).argmax(axis=1)
    if config.repetition_penalty != 1.0:
        scores = penalize_repetition(scores, np.asarray(generated, dtype=np.int64), config.repetition_penalty, ignore)
    if config.no_repeat_ngram_size:
        scores = ban_repeated_ngrams(scores, np.asarray(generated, dtype=np.int64), config.no_repeat_ngram_size,
                                     ignore)
    if new_tokens < config.min_new_tokens and config.eos_ids:
        scores = hold_back_eos(scores, config.eos_ids)
    if rules is not None:
        scores = rules(scores)
    if not config.do_sample:  # the warpers below change no argmax, so greedy decoding skips them like transformers
        return scores
    if config.temperature != 1.0:
        scores = scale_temperature(scores, config.temperature)
    if config.top_k:
        scores = filter_top_k(scores, config.top_k)
    if config.top_p is not None and config.top_p < 1.0:
        scores = filter_top_p(scores, config.top_p)
    return scores


def select_next(scores: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    """(B, V) processed scores -> (B,) int64 next ids: argmax, or one draw from softmax(scores) when sampling."""
    if not config.do_sample:
        return scores.argmax(axis=-1).astype(np.int64)
    # Inverse CDF in float64: a filtered (-inf) token has zero width and can never be drawn.
    cdf = np.cumsum(softmax(scores.astype(np.float64)), axis=-1)  # (B, V)
    u = rng.random((scores.shape[0], 1)) * cdf[:, -1:]  # (B, 1)
    drawn = (cdf <= u).sum(axis=-1)  # the first index whose cdf exceeds u
    # u can round up to the total; then take the last token with any probability (where the cdf first peaks)
    return np.minimum(drawn, cdf.argmax(axis=-1)).astype(np.int64)
