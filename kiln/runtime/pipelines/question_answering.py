"""question-answering: extractive answers as transformers 4.57's ``pipeline("question-answering")`` gave them.

transformers 5 removed this pipeline; kiln keeps the behaviour of its last release (4.57): the same inputs, the same
``{"score", "start", "end", "answer"}`` answers (character offsets into the context), the same long-context windows
and the same span scores, including its habits: spans whose text is equal ignoring case are merged (scores added,
the first position kept), a call with one question returns one result even when given as a one-item list, and the
null answer scores the lowest null probability over the windows.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from kiln.errors import InputError
from kiln.runtime.pipelines.base import Pipeline, check_int, given
from kiln.runtime.scores import softmax


class QuestionAnsweringPipeline(Pipeline):
    """Inputs: ``pipe(question=..., context=...)`` (a str each, a list each, or a list of questions and one context),
    ``pipe(question, context)``, or ``{"question": ..., "context": ...}`` dicts, alone or in a list.

    Options, with transformers' defaults: ``top_k=1`` answers (a dict when one answer comes back, else a list),
    ``max_answer_len=15`` tokens, ``max_seq_len=min(model maximum, 384)`` tokens per window, ``doc_stride`` tokens of
    overlap between windows of a long context (``min(max_seq_len // 2, 128)``), ``handle_impossible_answer=False``
    (adds the empty answer, scored by the [CLS] token), ``align_to_words=True`` (widen spans to whole words).
    ``max_question_len`` and ``padding`` are accepted and, as in transformers with a fast tokenizer, change nothing.
    """

    task = "question-answering"

    def setup(self) -> None:
        cls_token = self.tokenizer.special_tokens.get("cls_token")
        self.cls_id = self.tokenizer.token_to_id(cls_token) if cls_token else None
        # transformers puts the question first unless the tokenizer pads on the left (then the context comes first).
        self.question_first = self.tokenizer.padding_side != "left"

    def _sanitize_parameters(self, top_k=None, doc_stride=None, max_answer_len=None, max_seq_len=None,
                             max_question_len=None, handle_impossible_answer=None, align_to_words=None, padding=None):
        # max_question_len and padding change nothing with a fast tokenizer, in transformers too
        check_options(**given(top_k=top_k, max_answer_len=max_answer_len, doc_stride=doc_stride,
                              max_seq_len=max_seq_len))
        return (given(doc_stride=doc_stride, max_seq_len=max_seq_len), {},
                given(top_k=top_k, handle_impossible_answer=handle_impossible_answer, max_answer_len=max_answer_len,
                      align_to_words=align_to_words))

    def __call__(self, *args, question=None, context=None, **kwargs):
        params = self._params(kwargs)
        if len(args) == 1 and isinstance(args[0], Iterator) and question is None and context is None:
            return self._iterate(args[0], *params)
        return self._call(gather_inputs(args, question, context), params, kwargs)

    def _items(self, inputs):
        # transformers returns one result, not a list of one, whenever exactly one question was asked.
        return len(inputs) == 1, inputs

    def _one(self, item):
        pairs = gather_inputs((item,), None, None)
        if len(pairs) != 1:
            raise InputError(f"Each item of an iterator input is one question; got {len(pairs)}.")
        return pairs[0]

    def preprocess(self, items, doc_stride=None, max_seq_len=None):
        max_seq_len, doc_stride = self.window_sizes(max_seq_len, doc_stride)
        if self.question_first:  # the context is cut into windows, the question repeated in each
            pairs, split, names = list(items), 1, ("question", "context")
        else:
            pairs, split, names = [(c, q) for q, c in items], 0, ("context", "question")
        windows = self.tokenizer.windows(pairs, max_length=max_seq_len, stride=doc_stride, split=split, names=names)
        return windows, [c for _, c in items]

    def window_sizes(self, max_seq_len, doc_stride) -> tuple[int, int]:
        limit = self.tokenizer.max_length
        if max_seq_len is None:
            max_seq_len = min(limit, 384)
        if max_seq_len > limit:
            raise InputError(f"max_seq_len={max_seq_len} is more than the model's maximum of {limit} tokens.")
        if doc_stride is None:
            doc_stride = min(max_seq_len // 2, 128)
        if doc_stride > max_seq_len:
            raise InputError(f"doc_stride ({doc_stride}) is larger than max_seq_len ({max_seq_len}).")
        return max_seq_len, doc_stride

    def forward(self, model_inputs, batch_size: int, head_mask=None) -> dict[str, np.ndarray]:
        # One long context makes many windows: run them batch_size rows at a time.
        windows, _ = model_inputs
        feed, rows = windows.feed(self.input_names), len(windows.example)
        extra = {} if head_mask is None else {"head_mask": head_mask}
        outputs = [self.engine.run({**{k: v[i:i + batch_size] for k, v in feed.items()}, **extra})
                   for i in range(0, rows, batch_size)]
        return {k: np.concatenate([o[k] for o in outputs]) for k in ("start_logits", "end_logits")}

    def postprocess(self, model_inputs, outputs, top_k=1, handle_impossible_answer=False, max_answer_len=15,
                    align_to_words=True) -> list:
        windows, contexts = model_inputs
        results = []
        for i, context in enumerate(contexts):
            rows = np.flatnonzero(windows.example == i)
            answers = self.answers(windows, rows, outputs, context, top_k, handle_impossible_answer, max_answer_len,
                                   align_to_words)
            results.append(answers[0] if len(answers) == 1 else answers)
        return results

    def answers(self, windows, rows, outputs, context, top_k, handle_impossible_answer, max_answer_len,
                align_to_words) -> list[dict]:
        """The best answers for one question over all windows of its context."""
        # Word alignment widens spans, and equal spans then merge: fetch more candidates than asked for.
        candidates = top_k * 2 + 10 if align_to_words else top_k
        sequence = 1 if self.question_first else 0
        answers, min_null = [], 1_000_000.0
        for row in rows:
            real = windows.tokens(row)
            allowed = self.allowed(windows, row, real)
            start = normalize(outputs["start_logits"][row, real].astype(np.float32), allowed)
            end = normalize(outputs["end_logits"][row, real].astype(np.float32), allowed)
            if handle_impossible_answer:
                min_null = min(min_null, float(start[0] * end[0]))
            start[0] = end[0] = 0.0  # the null answer is scored apart, never as a span
            for s, e, score in zip(*decode_spans(start, end, candidates, max_answer_len, allowed)):
                a, b = char_span(windows, row, int(s), int(e), sequence, align_to_words)
                text = context[a:b]
                same = next((x for x in answers if x["answer"].lower() == text.lower()), None)
                if same:
                    same["score"] += float(score)
                else:
                    answers.append({"score": float(score), "start": a, "end": b, "answer": text})
        if handle_impossible_answer:
            answers.append({"score": min_null, "start": 0, "end": 0, "answer": ""})
        return sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]

    def allowed(self, windows, row: int, real: slice) -> np.ndarray:
        """Tokens that may be part of an answer: the context's, and [CLS] (the null answer of SQuAD 2 models)."""
        if self.question_first:
            allowed = np.array([s == 1 for s in windows.sequence_ids[row]], dtype=bool)
        else:  # transformers masks nothing when the context comes first
            allowed = np.ones(len(windows.sequence_ids[row]), dtype=bool)
        if self.cls_id is not None:
            allowed |= windows.input_ids[row, real] == self.cls_id
        return allowed


def normalize(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Softmax over the allowed tokens; the others get -10000, as transformers does, so they weigh ~nothing."""
    return softmax(np.where(allowed, logits, np.float32(-10000.0)))


def decode_spans(start: np.ndarray, end: np.ndarray, top_k: int, max_answer_len: int, allowed: np.ndarray):
    """The ``top_k`` best (start, end) token pairs by ``start[s] * end[e]`` with s <= e < s + max_answer_len, keeping
    those whose ends are both allowed: (starts, ends, scores). The same selection as transformers' ``decode_spans``,
    so that ties (zero-score spans of tiny contexts) resolve the same way."""
    outer = start[:, None] * end[None, :]  # (T, T): P(start = s) P(end = e)
    candidates = np.tril(np.triu(outer), max_answer_len - 1)  # zero where e < s or the span is too long
    flat = candidates.ravel()
    if top_k == 1:
        order = np.array([np.argmax(flat)])
    elif len(flat) <= top_k:  # transformers 4.57 crashes when they are equal (argpartition out of bounds)
        order = np.argsort(-flat)
    else:
        best = np.argpartition(-flat, top_k)[:top_k]
        order = best[np.argsort(-flat[best])]
    starts, ends = np.unravel_index(order, candidates.shape)
    keep = allowed[starts] & allowed[ends]
    starts, ends = starts[keep], ends[keep]
    return starts, ends, candidates[starts, ends]


def char_span(windows, row: int, s: int, e: int, sequence: int, align_to_words: bool) -> tuple[int, int]:
    """Character offsets in the context of tokens s..e; with ``align_to_words`` from the start of s's word to the end
    of e's. A token outside any word (a special token) falls back to token offsets, as in transformers."""
    offsets = windows.offsets[row]
    if align_to_words:
        first, last = word_chars(windows, row, s, sequence), word_chars(windows, row, e, sequence)
        if first is not None and last is not None:
            return first[0], last[1]
    return offsets[s][0], offsets[e][1]


def word_chars(windows, row: int, token: int, sequence: int) -> tuple[int, int] | None:
    """Characters of the word holding ``token``, within text ``sequence`` of this window (tokenizers'
    ``word_to_chars(token_to_word(token), sequence)``); None for special tokens or a word not in that text."""
    word = windows.word_ids[row][token]
    if word is None:
        return None
    same = [i for i, (w, s) in enumerate(zip(windows.word_ids[row], windows.sequence_ids[row]))
            if w == word and s == sequence]
    if not same:
        return None
    return windows.offsets[row][same[0]][0], windows.offsets[row][same[-1]][1]


def check_options(top_k=1, max_answer_len=15, doc_stride=None, max_seq_len=None) -> None:
    """Before any work; doc_stride and max_seq_len default (None) to values that depend on the model."""
    checks = [("top_k", top_k, 1), ("max_answer_len", max_answer_len, 1)]
    checks += [(name, value, least) for name, value, least in (("doc_stride", doc_stride, 0),
                                                               ("max_seq_len", max_seq_len, 1)) if value is not None]
    for name, value, least in checks:
        check_int(name, value, least)


def gather_inputs(args: tuple, question, context) -> list[tuple[str, str]]:
    """(question, context) pairs from the ways transformers 4.57 accepted them."""
    if args and (question is not None or context is not None):
        raise InputError("Give the inputs either positionally or as question=/context=, not both.")
    if args:
        if len(args) == 2 and all(isinstance(a, str) for a in args):
            items = [{"question": args[0], "context": args[1]}]
        else:
            items = args[0] if len(args) == 1 else list(args)
    elif question is not None and context is not None:
        items = _keyword_items(question, context)
    elif question is not None or context is not None:
        raise InputError("question-answering needs both question= and context=.")
    else:
        raise InputError('No input: call pipe(question=..., context=...) or pipe({"question": ..., "context": ...}).')
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, (list, tuple)):
        raise InputError('question-answering takes question= and context=, or {"question": ..., "context": ...} '
                         f"dicts (alone or in a list), got {type(items).__name__}.")
    if not items:
        raise InputError("The input list is empty; give at least one question.")
    return [_pair(item) for item in items]


def _keyword_items(question, context) -> list[dict]:
    if isinstance(question, list) and isinstance(context, str):
        return [{"question": q, "context": context} for q in question]
    if isinstance(question, list) and isinstance(context, list):
        if len(question) != len(context):
            raise InputError(f"Got {len(question)} questions but {len(context)} contexts; give one context per "
                             "question, or a single context for all.")
        return [{"question": q, "context": c} for q, c in zip(question, context)]
    if isinstance(question, str) and isinstance(context, str):
        return [{"question": question, "context": context}]
    raise InputError("question= and context= must be strings, lists of strings of the same length, or a list of "
                     f"questions with one context; got {type(question).__name__} and {type(context).__name__}.")


def _pair(item) -> tuple[str, str]:
    if not isinstance(item, dict):
        raise InputError(f'Each input must be a dict {{"question": ..., "context": ...}}, got {type(item).__name__}.')
    for key in ("question", "context"):
        if key not in item:
            raise InputError(f'An input dict lacks "{key}": give {{"question": ..., "context": ...}}.')
        value = item[key]
        if value is None:
            raise InputError(f"`{key}` cannot be None.")
        if not isinstance(value, str):
            raise InputError(f"`{key}` must be a string, got {type(value).__name__}.")
        if not value:
            raise InputError(f"`{key}` cannot be empty.")
    return item["question"], item["context"]
