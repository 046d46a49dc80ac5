"""kiln.runtime.Batcher: concurrent single requests gathered into shared calls, each caller getting its own outcome."""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import kiln
from kiln.errors import ClosedError, InputError
from kiln.runtime import Batcher

TEXTS = ["hello world", "the movie was great and i love it", "paris is the capital city of france",
         "a terrible bad film", "he runs fast through london", "Hello, world! I love Paris. 3.14 is pi?"]


def assert_close(got, want, path="result"):
    """Equal structure and labels; floats within 1e-5 (a batch pads inputs, which moves the last digits)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{path}: {got!r} != {want!r}"
        for key in want:
            assert_close(got[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), f"{path}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert isinstance(got, float) and math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-5), f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


class Recorder:
    """A list -> list callable that records each call and can be slowed down or made to fail on chosen items."""

    def __init__(self, fn=lambda x: x * 10, delay_s: float = 0.0, bad=()):
        self.fn, self.delay_s, self.bad = fn, delay_s, set(bad)
        self.calls: list[tuple[list, dict]] = []
        self.lock = threading.Lock()

    def __call__(self, items, **kwargs):
        with self.lock:
            self.calls.append((list(items), kwargs))
        time.sleep(self.delay_s)  # stands for engine work, during which other requests queue up
        for item in items:
            if item in self.bad:
                raise ValueError(f"bad item {item}")
        return [self.fn(item) + kwargs.get("offset", 0) for item in items]

    @property
    def sizes(self) -> list[int]:
        return [len(items) for items, _ in self.calls]


def test_pipelines_give_each_caller_what_an_unbatched_call_gives(artifacts):
    cases = {
        "feature-extraction": [((t,), {"pooling": "mean", "normalize": True}) for t in TEXTS] + [((t,), {}) for t in TEXTS],
        # a lone string comes back as a one-item list without top_k, unlike an item of a list (transformers' rule)
        "text-classification": [((t,), {}) for t in TEXTS] + [(({"text": t, "text_pair": "hello"},), {"top_k": None})
                                                             for t in TEXTS],
        "token-classification": [((t,), {"aggregation_strategy": "simple", "ignore_labels": []}) for t in TEXTS],
        "fill-mask": [((f"{t} [MASK]",), {"top_k": 3}) for t in TEXTS],
        "question-answering": [(({"question": "where", "context": t},), {}) for t in TEXTS],
    }
    for task, calls in cases.items():
        pipe = kiln.pipeline(task, artifacts("bert", task), batch_size=16)
        calls = calls * 4  # 48 requests or so from 16 threads
        want = [pipe(*args, **kwargs) for args, kwargs in calls]
        with Batcher(pipe, max_batch_size=16, max_wait_ms=20) as batcher, ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda call: batcher(*call[0], **call[1]), calls))
        for g, w in zip(got, want):
            assert_close(g, w, task)
        assert max(batcher.batch_sizes) > 1, f"{task}: no call gathered several requests ({batcher.batch_sizes})"


def test_image_pipeline(vit_artifacts):
    pipe = kiln.pipeline("image-classification", vit_artifacts("image-classification"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(24)]
    want = [pipe(image, top_k=2) for image in images]
    with Batcher(pipe, max_batch_size=8, max_wait_ms=20) as batcher, ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda image: batcher(image, top_k=2), images))
    assert_close(got, want)
    assert max(batcher.batch_sizes) > 1


def test_many_callers_form_real_batches():
    fn = Recorder(delay_s=0.01)
    with Batcher(fn, max_batch_size=8, max_wait_ms=5) as batcher, ThreadPoolExecutor(16) as pool:
        got = list(pool.map(batcher, range(400)))
    assert got == [x * 10 for x in range(400)]
    assert sum(fn.sizes) == 400 and max(fn.sizes) == 8 and len(fn.sizes) < 200, fn.sizes
    assert sorted(batcher.batch_sizes.elements()) == sorted(fn.sizes)


def test_a_lone_caller_waits_max_wait_then_runs_alone():
    fn = Recorder()
    with Batcher(fn, max_batch_size=8, max_wait_ms=100) as batcher:
        started = time.perf_counter()
        assert batcher(3) == 30
        elapsed = time.perf_counter() - started
    assert 0.095 <= elapsed < 0.6, elapsed
    assert fn.sizes == [1]


def test_a_full_batch_does_not_wait():
    fn = Recorder()
    with Batcher(fn, max_batch_size=4, max_wait_ms=60_000) as batcher:
        start = threading.Barrier(4)

        def call(x):
            start.wait()
            return batcher(x)

        started = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(call, range(4))) == [0, 10, 20, 30]
        assert time.perf_counter() - started < 5
    assert fn.sizes == [4]


def test_a_bad_input_fails_only_its_caller():
    fn = Recorder(bad={3})
    with Batcher(fn, max_batch_size=6, max_wait_ms=60_000) as batcher:
        futures = [batcher.submit(x) for x in range(6)]  # six queued at once: one call of six, which fails
        with pytest.raises(ValueError, match="bad item 3"):
            futures[3].result()
        assert [f.result() for i, f in enumerate(futures) if i != 3] == [0, 10, 20, 40, 50]
    assert fn.sizes == [6, 1, 1, 1, 1, 1, 1]  # the shared call, then each input alone


def test_a_bad_input_to_a_pipeline_fails_only_its_caller(artifacts):
    pipe = kiln.pipeline("fill-mask", artifacts("bert", "fill-mask"))
    texts = [f"{t} [MASK]" for t in TEXTS[:3]] + ["no mask here"] + [f"[MASK] {t}" for t in TEXTS[3:]]
    with Batcher(pipe, max_batch_size=len(texts), max_wait_ms=60_000) as batcher:
        futures = [batcher.submit(t) for t in texts]
        with pytest.raises(InputError, match=r"No mask_token \(\[MASK\]\)"):
            futures[3].result()
        for text, future in zip(texts, futures):
            if text != "no mask here":
                assert_close(future.result(), pipe(text))
    assert batcher.batch_sizes == {len(texts): 1, 1: len(texts)}


def test_a_callable_returning_the_wrong_number_of_results_is_an_error():
    with Batcher(lambda items: items[:1], max_batch_size=2, max_wait_ms=60_000) as batcher:
        first, second = batcher.submit("a"), batcher.submit("b")
        # the shared call returns one result for two inputs; alone, each input gets its own (correct) result
        assert (first.result(), second.result()) == ("a", "b")
    with Batcher(lambda items: None) as batcher, pytest.raises(kiln.errors.KilnError, match="returned NoneType for 1"):
        batcher("a")


def test_only_equal_options_share_a_call():
    fn = Recorder()
    big = np.arange(3)
    requests = [(1, {}), (2, {"offset": 1}), (3, {}), (4, {"offset": 1}), (5, {"offset": True}), (6, {"offset": 1.0}),
                (7, {"offset": big}), (8, {"offset": big}), (9, {"offset": np.arange(3)})]
    with Batcher(fn, max_batch_size=len(requests), max_wait_ms=60_000) as batcher:
        futures = [batcher.submit(x, **kwargs) for x, kwargs in requests]
        results = [f.result() for f in futures]
    assert results[:6] == [10, 21, 30, 41, 51, 61.0] and type(results[5]) is float
    for got, want in zip(results[6:], ([70, 71, 72], [80, 81, 82], [90, 91, 92])):
        np.testing.assert_array_equal(got, want)
    # equal values of the same type share a call (first-come order); True is not 1, 1.0 is not 1; arrays share by identity
    assert [(items, sorted(kwargs)) for items, kwargs in fn.calls] == [
        ([1, 3], []), ([2, 4], ["offset"]), ([5], ["offset"]), ([6], ["offset"]), ([7, 8], ["offset"]), ([9], ["offset"])]


def test_close_finishes_the_running_call_and_fails_the_queued_ones():
    entered, release = threading.Event(), threading.Event()

    def slow(items):
        entered.set()
        release.wait(10)
        return [x * 10 for x in items]

    batcher = Batcher(slow, max_batch_size=1, max_wait_ms=0)
    running = batcher.submit(1)
    assert entered.wait(5)  # the worker has taken it and waits inside the call
    cancelled = batcher.submit(5)
    assert cancelled.cancel()  # close() must not trip over it
    queued = [batcher.submit(x) for x in (2, 3)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    for future in queued:
        with pytest.raises(ClosedError, match="closed before this request ran"):
            future.result(timeout=5)
    assert batcher.closed and not running.done()
    release.set()
    closer.join(5)
    assert running.result(timeout=5) == 10 and not batcher._worker.is_alive()
    with pytest.raises(ClosedError, match="This Batcher is closed"):
        batcher(4)
    batcher.close()  # again: nothing to do


def test_context_manager_closes(artifacts):
    pipe = kiln.pipeline("feature-extraction", artifacts("bert", "feature-extraction"))
    with Batcher(pipe) as batcher:
        assert_close(batcher(TEXTS[0], pooling="cls"), pipe(TEXTS[0], pooling="cls"))
    assert batcher.closed and not batcher._worker.is_alive()
    with pytest.raises(ClosedError):
        batcher(TEXTS[0])
    assert pipe(TEXTS[0])  # the pipeline itself stays usable


def test_cancelled_requests_are_skipped():
    fn = Recorder()
    with Batcher(fn, max_batch_size=3, max_wait_ms=500) as batcher:
        keep, drop = batcher.submit(1), batcher.submit(2)
        assert drop.cancel()
        assert keep.result() == 10
    assert fn.calls == [([1], {})]


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_batch_size=0), "max_batch_size must be an integer >= 1"),
    (dict(max_batch_size=2.5), "max_batch_size must be an integer >= 1"),
    (dict(max_wait_ms=-1), "max_wait_ms must be a number >= 0"),
    (dict(max_wait_ms=float("nan")), "max_wait_ms must be a number >= 0"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(InputError, match=message):
        Batcher(Recorder(), **kwargs)
    with pytest.raises(InputError, match="got int"):
        Batcher(42)


def test_a_small_pipeline_batch_size_is_pointed_out(artifacts, caplog):
    pipe = kiln.pipeline("feature-extraction", artifacts("bert", "feature-extraction"), batch_size=4)
    with Batcher(pipe, max_batch_size=16):
        pass
    assert "batch_size=4 is below max_batch_size=16" in caplog.text
