"""One pipeline object, many threads: 8 threads x 200 calls of every pipeline, each output equal to the serial one.

Each thread walks the same cases from its own offset, so neighbouring threads run different inputs (and options) at
the same moment: state leaking between calls shows up as a wrong output, not only as a crash. The threaded calls go
to a fresh pipeline object, so its lazily built state (tokenizer variants, per-thread IO bindings, compiled chat
templates) is first built under contention. The figures are printed (`pytest -s`).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import kiln

THREADS, CALLS = 8, 200
TEXTS = ["hello world", "the movie was great and i love it", "paris is the capital city of france",
         "a terrible bad film", "he runs fast through london", "Hello, world! I love Paris. 3.14 is pi?",
         "we say her she or will my one all would there their what so up out if about who get which go me when",
         "kiln"]


def hammer(name: str, make_pipe, cases: list[tuple[tuple, dict]]) -> None:
    """Serial outputs of ``cases`` (args, kwargs) from one pipeline, then THREADS x CALLS threaded calls of a fresh
    pipeline; every threaded output must equal the serial output of its case."""
    serial_pipe = make_pipe()
    serial = [serial_pipe(*args, **kwargs) for args, kwargs in cases]
    assert len({repr(s) for s in serial}) > 1, "the cases must give different outputs, or a mix-up cannot show"
    pipe, start = make_pipe(), threading.Barrier(THREADS)

    def work(thread: int) -> list[int]:
        start.wait()  # all threads begin together, on the fresh pipeline's cold caches
        wrong = []
        for i in range(CALLS):
            k = (thread * 5 + i) % len(cases)
            args, kwargs = cases[k]
            if pipe(*args, **kwargs) != serial[k]:
                wrong.append(k)
        return wrong

    started = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        wrong = [k for ks in pool.map(work, range(THREADS)) for k in ks]
    seconds = time.perf_counter() - started
    print(f"\n{name}: {THREADS} threads x {CALLS} calls ({len(cases)} distinct inputs), "
          f"{THREADS * CALLS - len(wrong)}/{THREADS * CALLS} identical to serial, {seconds:.1f} s")
    assert not wrong, f"{len(wrong)} threaded outputs differ from serial ones (cases {sorted(set(wrong))})"


def test_feature_extraction(artifacts):
    art = artifacts("bert", "feature-extraction")
    cases = [((t,), {}) for t in TEXTS[:4]]
    cases += [((TEXTS[4:7],), dict(pooling="mean", normalize=True)), ((TEXTS[:3],), dict(pooling="cls")),
              ((TEXTS[7],), dict(pooling="mean"))]
    hammer("feature-extraction", lambda: kiln.pipeline("feature-extraction", art), cases)


def test_text_classification(artifacts):
    art = artifacts("bert", "text-classification")
    cases = [((t,), {}) for t in TEXTS[:4]]
    cases += [((TEXTS[4:],), dict(top_k=None)), (({"text": TEXTS[2], "text_pair": TEXTS[3]},), {}),
              ((TEXTS[1],), dict(top_k=2, function_to_apply="sigmoid"))]
    hammer("text-classification", lambda: kiln.pipeline("text-classification", art), cases)


def test_token_classification(artifacts):
    art = artifacts("bert", "token-classification")
    strategies = ["none", "simple", "first", "average", "max"]
    cases = [((t,), dict(aggregation_strategy=strategies[i % 5], ignore_labels=[])) for i, t in enumerate(TEXTS)]
    cases.append(((TEXTS[:3],), dict(aggregation_strategy="simple", ignore_labels=[])))
    hammer("token-classification", lambda: kiln.pipeline("token-classification", art), cases)


def test_question_answering(artifacts):
    art = artifacts("bert", "question-answering")
    long = " ".join(TEXTS * 3)  # longer than the windows below: several windows per question
    cases = [((), dict(question="where is paris", context=TEXTS[2])),
             ((), dict(question="who runs", context=TEXTS[4], top_k=3)),
             ((), dict(question="what is pi", context=long, max_seq_len=32, doc_stride=8)),
             ((), dict(question="what is pi", context=long, max_seq_len=24, doc_stride=4, top_k=2)),
             (([{"question": "capital", "context": TEXTS[2]}, {"question": "film", "context": TEXTS[3]}],),
              dict(handle_impossible_answer=True))]
    # each (max_seq_len, doc_stride) builds its own tokenizer variant lazily, under a lock: contended here
    hammer("question-answering", lambda: kiln.pipeline("question-answering", art), cases)


def test_fill_mask(artifacts):
    art = artifacts("bert", "fill-mask")
    cases = [(("paris is the [MASK] of france",), {}), (("the [MASK] was great",), dict(top_k=2)),
             (("hello [MASK]",), dict(targets=["world", "paris", "city"])),
             (("[MASK] runs [MASK] through london",), dict(top_k=3)),
             ((["a [MASK] film", "i [MASK] it"],), {})]
    hammer("fill-mask", lambda: kiln.pipeline("fill-mask", art), cases)


def test_image_classification(vit_artifacts):
    art = vit_artifacts("image-classification")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in [(32, 32, 3), (40, 24, 3), (3, 32, 32),
                                                                                (16, 16), (48, 48, 4)]]
    cases = [((image,), {}) for image in images]
    cases += [((images[:3],), dict(top_k=2)), ((images[3],), dict(function_to_apply="sigmoid", top_k=1))]
    hammer("image-classification", lambda: kiln.pipeline("image-classification", art), cases)


# Copied from tests.runtime.test_text_generation (CHATML and the "llama-gqa" entry of VARIANTS)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA_GQA = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """A tiny random Llama (grouped-query attention) with a byte-level BPE tokenizer and a ChatML template."""
    # Copied from tests.runtime.test_text_generation.decoders, for the one variant used here
    import torch
    import transformers
    from conftest import roberta_tokenizer

    tokenizer = roberta_tokenizer()
    tokenizer.chat_template = CHATML
    config = transformers.AutoConfig.for_model("llama", vocab_size=len(tokenizer), initializer_range=0.3,
                                               bos_token_id=0, pad_token_id=1, eos_token_id=2, **LLAMA_GQA)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ckpt = tmp_path_factory.mktemp("llama-gqa")
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    out = tmp_path_factory.mktemp("art") / "llama-gqa"
    kiln.export(str(ckpt), out, task="text-generation", batch="1:4")
    return out


class Stream:
    """A case that reads ``pipe.stream(...)`` to the end instead of calling the pipeline."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __call__(self, prompt, **kwargs):
        return list(self.pipe.stream(prompt, **kwargs))


def test_text_generation(decoder):
    cases = [(("hello world",), dict(max_new_tokens=3)), (("the river runs",), dict(max_new_tokens=3)),
             (("paris",), dict(max_new_tokens=3, repetition_penalty=1.3)),
             (("a film",), dict(max_new_tokens=3, do_sample=True, top_k=20, top_p=0.9, seed=1)),
             (("a film",), dict(max_new_tokens=3, do_sample=True, temperature=1.5, seed=2)),
             ((["hello", "we say her she or"],), dict(max_new_tokens=3, return_full_text=False)),
             (([{"role": "user", "content": "hello world"}],), dict(max_new_tokens=3)),
             (("london is",), dict(max_new_tokens=3, stop_strings=["e"]))]
    hammer("text-generation", lambda: kiln.pipeline("text-generation", decoder), cases)


def test_text_generation_stream(decoder):
    # each stream decodes in a thread of its own: its IO binding is made for it and released after it
    cases = [(("hello world",), dict(max_new_tokens=3)), (("the river runs",), dict(max_new_tokens=3)),
             (("a film",), dict(max_new_tokens=3, do_sample=True, seed=3)), (("paris",), dict(max_new_tokens=3))]
    hammer("text-generation stream", lambda: Stream(kiln.pipeline("text-generation", decoder)), cases)
