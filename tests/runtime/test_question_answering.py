"""question-answering: kiln vs transformers 4.57's pipeline (the last release with it, run from .venv-hf457 by
hf457_qa.py), and vs answers computed here from the reference model's start/end logits, which run without that venv.

The tiny models take 64 tokens, so the long contexts below really split into several overlapping windows.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same  # noqa: F401  (also imported from here by other test modules)

import kiln
from kiln.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
ORACLE_PYTHON = ROOT / ".venv-hf457" / "bin" / "python"
ORACLE_SCRIPT = Path(__file__).with_name("hf457_qa.py")
MODEL_TYPES = ("bert", "roberta")

Q1, Q2 = "what is the capital of france", "who builds the ovens"
CTX = "paris is the capital city of france and the river runs through it"
# Words outside the tiny vocabularies split into pieces (word alignment matters); "Paris"/"paris" merge by case.
PUNCT = "Hello, world! I love Paris. The kilnsmith of paris builds ovens; 3.14 is pi?"
LONG = ("the river runs through paris and london . " * 5 + CTX + " . berlin is the capital city of germany , "
        "london of england . we love the great film about the city . " * 2)

CASES = {  # name -> (args, kwargs) of one pipeline call
    "short": ((), dict(question=Q1, context=CTX)),
    "short_top3": ((), dict(question=Q1, context=CTX, top_k=3)),
    "punctuation_top3": ((), dict(question=Q2, context=PUNCT, top_k=3)),
    "not_aligned_top3": ((), dict(question=Q2, context=PUNCT, top_k=3, align_to_words=False)),
    "max_answer_len": ((), dict(question=Q1, context=CTX, top_k=3, max_answer_len=2)),
    "impossible": ((), dict(question=Q1, context=CTX, top_k=3, handle_impossible_answer=True)),
    "long": ((), dict(question=Q1, context=LONG)),
    "long_top3_impossible": ((), dict(question=Q1, context=LONG, top_k=3, handle_impossible_answer=True)),
    "long_stride": ((), dict(question=Q1, context=LONG, top_k=3, doc_stride=10, max_seq_len=40)),
    "long_not_aligned": ((), dict(question=Q2, context=LONG, top_k=2, align_to_words=False, max_answer_len=5)),
    # 40 + special tokens leave less than doc_stride for the context, which is fine while no window is needed.
    "long_question": ((), dict(question=" ".join(["the"] * 40), context="the river runs through it", top_k=2)),
    "tiny_context_top5": ((), dict(question=Q1, context="paris", top_k=5)),  # fewer spans than asked: zero scores
    "options_ignored": ((), dict(question=Q1, context=CTX, max_question_len=3, padding="max_length")),
    "dict": (({"question": Q1, "context": CTX},), {}),
    "list_of_one": (([{"question": Q1, "context": CTX}],), {}),
    "list": (([{"question": Q1, "context": CTX}, {"question": Q2, "context": PUNCT},
               {"question": Q1, "context": LONG}],), {"top_k": 2}),
    "questions_one_context": ((), dict(question=[Q1, Q2, "where is it"], context=LONG)),
    "questions_contexts": ((), dict(question=[Q1, Q2], context=[CTX, PUNCT], top_k=2)),
    "positional": ((Q1, CTX), {}),
}
# name -> (options at construction, args, kwargs, whether args[0] goes in as a generator)
OPTION_CASES = {
    "made_with_top_k": ({"top_k": 2}, (), dict(question=Q1, context=CTX), False),
    "made_with_options_call_overrides": ({"top_k": 2, "max_answer_len": 2, "align_to_words": False}, (),
                                         dict(question=Q2, context=PUNCT, top_k=3, max_answer_len=5), False),
    "generator": ({}, ([{"question": Q1, "context": CTX}, {"question": Q2, "context": PUNCT},
                        {"question": Q1, "context": LONG}],), {}, True),
    "generator_made_with_top_k": ({"top_k": 2},
                                  ([{"question": Q1, "context": LONG}, {"question": Q2, "context": CTX}],),
                                  {"handle_impossible_answer": True}, True),
}
ERRORS = {  # name -> (args, kwargs, what kiln's InputError says)
    "empty_question": ((), dict(question="", context=CTX), "`question` cannot be empty"),
    "empty_context": ((), dict(question=Q1, context=""), "`context` cannot be empty"),
    "none_context": (({"question": Q1, "context": None},), {}, "`context` cannot be None"),
    "missing_context": (({"question": Q1},), {}, 'lacks "context"'),
    "not_a_dict": ((["what is it"],), {}, "must be a dict"),
    "length_mismatch": ((), dict(question=[Q1, Q2], context=[CTX]), "2 questions but 1 contexts"),
    "question_over_window": ((), dict(question=" ".join(["paris"] * 70), context=CTX), "no room for the context"),
    "question_over_stride": ((), dict(question=" ".join(["paris"] * 45), context=LONG),
                             "no room|more than the overlap"),
    "top_k_0": ((), dict(question=Q1, context=CTX, top_k=0), "top_k must be"),
    "max_answer_len_0": ((), dict(question=Q1, context=CTX, max_answer_len=0), "max_answer_len must be"),
    "stride_over_window": ((), dict(question=Q1, context=CTX, doc_stride=50, max_seq_len=40),
                           "larger than max_seq_len"),
}



@pytest.fixture(scope="module")
def oracle(checkpoints):
    """transformers 4.57's answers to every case, for both models, from one subprocess."""
    if not ORACLE_PYTHON.is_file():
        pytest.skip("transformers 4.57 oracle venv missing (.venv-hf457): run `bash scripts/setup.sh` to create it")
    keys, calls = [], []
    for model_type in MODEL_TYPES:
        path, _ = checkpoints(model_type, "question-answering")
        for name, (args, kwargs, *_) in {**CASES, **ERRORS}.items():
            keys.append((model_type, name))
            calls.append({"model": str(path), "args": list(args), "kwargs": kwargs})
        for name, (init, args, kwargs, generator) in OPTION_CASES.items():
            keys.append((model_type, name))
            calls.append({"model": str(path), "init": init, "args": list(args), "kwargs": kwargs,
                          "generator": generator})
    done = subprocess.run([str(ORACLE_PYTHON), str(ORACLE_SCRIPT)], input=json.dumps({"calls": calls}),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reply = json.loads(done.stdout)
    assert reply["transformers"].startswith("4.57."), reply["transformers"]
    return dict(zip(keys, reply["answers"]))


@pytest.fixture(scope="module")
def pipes(artifacts):
    return {m: kiln.pipeline("question-answering", artifacts(m, "question-answering")) for m in MODEL_TYPES}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers_457(model_type, name, oracle, pipes):
    args, kwargs = CASES[name]
    theirs = oracle[(model_type, name)]
    assert "error" not in theirs, theirs
    assert_same(pipes[model_type](*args, **kwargs), theirs["result"])


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_options_at_construction_and_generators_match_transformers_457(model_type, name, oracle, artifacts):
    init, args, kwargs, generator = OPTION_CASES[name]
    theirs = oracle[(model_type, name)]
    assert "error" not in theirs, theirs
    pipe = kiln.pipeline("question-answering", artifacts(model_type, "question-answering"), **init)
    if generator:
        args = ((item for item in args[0]),)
    ours = pipe(*args, **kwargs)
    assert_same(list(ours) if generator else ours, theirs["result"])


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_input_fails_where_transformers_457_fails(model_type, name, oracle, pipes):
    args, kwargs, message = ERRORS[name]
    assert "error" in oracle[(model_type, name)], oracle[(model_type, name)]
    with pytest.raises(InputError, match=message):
        pipes[model_type](*args, **kwargs)


# Without the oracle venv: answers rebuilt here from the reference model's logits, by brute force over every span.

def reference_answers(model, tokenizer, question, context, top_k=1, max_answer_len=15, handle_impossible_answer=False,
                      align_to_words=True, max_seq_len=64, doc_stride=None):
    """transformers 4.57's answer rules, written plainly: per window, softmax over the context tokens and [CLS];
    the best spans by P(start) P(end) (over-fetched when aligning to words); spans equal ignoring case merge."""
    import torch

    enc = tokenizer(question, context, truncation="only_second", max_length=max_seq_len,
                    stride=min(max_seq_len // 2, 128) if doc_stride is None else doc_stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True)
    fetch = top_k * 2 + 10 if align_to_words else top_k
    answers, null = [], float("inf")
    for w in range(len(enc["input_ids"])):
        feed = {k: torch.tensor([enc[k][w]]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        with torch.no_grad():
            out = model(**feed)
        ok = np.array([s == 1 or i == 0 for i, s in enumerate(enc.sequence_ids(w))])  # context + [CLS] at 0
        p_start, p_end = (softmax_where(out[k][0].double().numpy(), ok) for k in ("start_logits", "end_logits"))
        null = min(null, p_start[0] * p_end[0])
        n = len(ok)
        spans = sorted(((p_start[s] * p_end[e], s, e) for s in range(1, n) for e in range(s, min(n, s + max_answer_len))
                        if ok[s] and ok[e]), reverse=True)[:fetch]
        for score, s, e in spans:
            a, b = enc["offset_mapping"][w][s][0], enc["offset_mapping"][w][e][1]
            if align_to_words:
                a = enc.word_to_chars(w, enc.token_to_word(w, s), sequence_index=1)[0]
                b = enc.word_to_chars(w, enc.token_to_word(w, e), sequence_index=1)[1]
            same = [x for x in answers if x["answer"].lower() == context[a:b].lower()]
            if same:
                same[0]["score"] += score
            else:
                answers.append({"score": score, "start": a, "end": b, "answer": context[a:b]})
    if handle_impossible_answer:
        answers.append({"score": null, "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
    return answers[0] if len(answers) == 1 else answers


def softmax_where(logits: np.ndarray, ok: np.ndarray) -> np.ndarray:
    e = np.where(ok, np.exp(logits - logits[ok].max()), 0.0)
    return e / e.sum()


REFERENCE_CASES = ["short", "short_top3", "punctuation_top3", "not_aligned_top3", "max_answer_len", "impossible",
                   "long", "long_top3_impossible", "long_stride", "long_not_aligned", "long_question"]


@pytest.fixture(scope="module")
def references(checkpoints):
    from transformers import AutoTokenizer

    found = {}
    for model_type in MODEL_TYPES:
        path, _ = checkpoints(model_type, "question-answering")
        model = kiln.from_pretrained(str(path), task="question-answering").eval()
        found[model_type] = model, AutoTokenizer.from_pretrained(path)
    return found


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("name", REFERENCE_CASES)
def test_answers_match_spans_from_reference_logits(model_type, name, references, pipes):
    _, kwargs = CASES[name]
    model, tokenizer = references[model_type]
    assert_same(pipes[model_type](**kwargs), reference_answers(model, tokenizer, **kwargs))


def test_long_contexts_really_split(pipes):
    pipe = pipes["bert"]
    windows = pipe.tokenizer.windows([(Q1, LONG), (Q1, CTX)], max_length=64, stride=32, names=("question", "context"))
    n = int((windows.example == 0).sum())
    assert n >= 3 and list(windows.example) == [0] * n + [1] and windows.input_ids.shape[1] == 64
    assert all(len(o) <= 64 for o in windows.offsets)
    # Consecutive windows overlap by the stride: the last 32 context tokens of one start the next.
    first, second = ([i for i, s in zip(windows.input_ids[r], windows.sequence_ids[r]) if s == 1] for r in (0, 1))
    assert first[-32:] == second[:32]


def test_batch_size_splits_windows_not_answers(artifacts, pipes):
    small = kiln.pipeline("question-answering", artifacts("bert", "question-answering"), batch_size=2)
    args, kwargs = CASES["list"]
    assert_same(small(*args, **kwargs), pipes["bert"](*args, **kwargs))


def test_output_shapes(pipes):
    pipe = pipes["bert"]
    assert isinstance(pipe(question=Q1, context=CTX), dict)
    two = pipe(question=Q1, context=CTX, top_k=2)
    assert isinstance(two, list) and len(two) == 2
    assert isinstance(pipe(question=[Q1], context=CTX), dict)  # one question: one result, as transformers 4.57
    many = pipe(question=[Q1, Q2], context=CTX, top_k=2)
    assert len(many) == 2 and all(isinstance(r, list) and len(r) == 2 for r in many)
    for answer in many[0]:
        assert CTX[answer["start"]:answer["end"]] == answer["answer"] and 0 <= answer["score"] <= 1


@pytest.mark.parametrize("call, message", [
    (lambda p: p(question=Q1), "both question= and context="),
    (lambda p: p(), "No input"),
    (lambda p: p([]), "empty"),
    (lambda p: p("just a question"), "takes question= and context="),
    (lambda p: p(question=Q1, context=42), "must be strings"),
    (lambda p: p({"question": Q1, "context": b"bytes"}), "must be a string, got bytes"),
    (lambda p: p(question=Q1, context=CTX, topk=2), r"Unknown question-answering option\(s\) \['topk'\]; the options "
                                                       "are align_to_words, doc_stride, "),
    (lambda p: p(question=Q1, context=CTX, top_k=1.5), "top_k must be"),
    (lambda p: p(question=Q1, context=CTX, max_seq_len=128), "model's maximum of 64"),
    (lambda p: p({"question": Q1, "context": CTX}, question=Q1, context=CTX), "not both"),
])
def test_kiln_errors(call, message, pipes):
    with pytest.raises(InputError, match=message):
        call(pipes["bert"])


def test_cli_reads_question_context_objects(artifacts, tmp_path, capsys):
    from kiln.cli.__main__ import main

    path = tmp_path / "in.jsonl"
    items = ({"question": Q1, "context": CTX}, {"question": Q2, "context": PUNCT})
    path.write_text("".join(json.dumps(d) + "\n" for d in items))
    art = artifacts("bert", "question-answering")
    pipe = kiln.pipeline("question-answering", art)
    assert main(["run", str(art), "--input", str(path), "--top-k", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert_same([line["output"] for line in lines], pipe(question=[Q1, Q2], context=[CTX, PUNCT], top_k=2))
    assert main(["run", str(art), "--question", Q1, "--context", CTX]) == 0
    assert_same(json.loads(capsys.readouterr().out)["output"], pipe(question=Q1, context=CTX))
    assert main(["run", str(art), "--question", Q1]) == 1
    assert "--question and --context go together" in capsys.readouterr().err
