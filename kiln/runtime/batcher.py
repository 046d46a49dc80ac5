"""Opt-in micro-batching: single requests from many threads gathered into one pipeline call.

A service that calls a pipeline from many threads with one input each runs many batch-1 engine calls, which use the
CPU (or GPU) less well than one call over several inputs. ``Batcher`` sits in between, like the dynamic batcher of
Triton Inference Server (``max_queue_delay``) or Ray Serve's ``@serve.batch``, but inside the process:

    with Batcher(pipe, max_batch_size=16, max_wait_ms=5) as batcher:
        batcher("one input", pooling="mean")        # from any number of threads; returns this input's result

A worker thread takes queued requests once ``max_batch_size`` are waiting or ``max_wait_ms`` has passed since the
oldest one came, groups them by their options (only requests with equal keyword arguments share a call), and makes
one call per group. Each caller gets its own result, or its own exception: when a call over several inputs fails,
its inputs are run again one by one, so a bad input fails only its own caller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from kiln.errors import ClosedError, InputError, KilnError
from kiln.runtime.pipelines.base import Pipeline, check_int

log = logging.getLogger("kiln")


@dataclass
class _Request:
    item: object
    kwargs: dict
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.monotonic)


class Batcher:
    """Wraps ``fn``: a kiln pipeline, or any callable that takes a list of inputs (and keyword options) and returns a
    list of their results in the same order. Calling the batcher with one input returns that input's result: for a
    pipeline, what ``pipe(item, **kwargs)`` returns (scores may differ in the last digits, from padding in a batch).

    Thread-safe; the wrapped callable is only ever called from the batcher's one worker thread. ``close()`` (or
    leaving the ``with`` block) lets the call in progress finish, fails the requests still queued with
    ``kiln.errors.ClosedError`` and stops the worker. ``batch_sizes`` counts the calls made by their number of inputs.
    """

    def __init__(self, fn: Callable, *, max_batch_size: int = 8, max_wait_ms: float = 5.0):
        if not callable(fn):
            raise InputError(f"Batcher wraps a pipeline or a callable taking a list of inputs, got {type(fn).__name__}.")
        check_int("max_batch_size", max_batch_size)
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not max_wait_ms >= 0:
            raise InputError(f"max_wait_ms must be a number >= 0, got {max_wait_ms!r}.")
        if isinstance(fn, Pipeline):
            # a pipeline shapes a one-item list (and a lone string) unlike a longer list: its batch() evens that out
            self._call = fn.batch
            if fn.batch_size < max_batch_size:
                log.warning("The pipeline's batch_size=%d is below max_batch_size=%d, so a gathered call runs in "
                            "chunks of %d; create the pipeline with batch_size=%d.", fn.batch_size, max_batch_size,
                            fn.batch_size, max_batch_size)
        else:
            self._call = fn
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_ms / 1000
        self.batch_sizes: Counter[int] = Counter()  # written by the worker thread only
        self._pending: deque[_Request] = deque()
        self._changed = threading.Condition()  # guards _pending and _closed
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="kiln-batcher", daemon=True)
        self._worker.start()

    def submit(self, item, **kwargs) -> Future:
        """Queue one input; the returned ``concurrent.futures.Future`` holds its result (or exception)."""
        request = _Request(item, kwargs)
        with self._changed:
            if self._closed:
                raise ClosedError("This Batcher is closed; create a new one (or call the pipeline directly).")
            self._pending.append(request)
            self._changed.notify()
        return request.future

    def __call__(self, item, **kwargs):
        """The result for one input, computed in a call shared with other threads' inputs where they coincide."""
        return self.submit(item, **kwargs).result()

    def close(self) -> None:
        """Finish the call in progress, fail the queued requests with ClosedError and stop the worker. Idempotent."""
        with self._changed:
            self._closed = True
            dropped = list(self._pending)
            self._pending.clear()
            self._changed.notify_all()
        for request in dropped:
            if request.future.set_running_or_notify_cancel():  # False: its caller cancelled it, nobody waits for it
                request.future.set_exception(ClosedError("The Batcher was closed before this request ran; send it "
                                                         "again to an open Batcher or to the pipeline itself."))
        if threading.current_thread() is not self._worker:  # close() from inside the wrapped callable must not wait for itself
            self._worker.join()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- the worker thread

    def _work(self) -> None:
        while (batch := self._gather()) is not None:
            for group in _groups(batch):
                self._run(group)

    def _gather(self) -> list[_Request] | None:
        """Block until a batch is due: max_batch_size requests queued, or max_wait since the oldest. None once closed."""
        with self._changed:
            while not self._pending and not self._closed:
                self._changed.wait()
            deadline = self._pending[0].queued + self.max_wait_s if self._pending else 0.0
            while not self._closed and len(self._pending) < self.max_batch_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)  # woken early by each new request, to check the size
            if self._closed:
                return None
            taken = [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch_size))]
        # a caller may have cancelled its Future while it waited; it needs no result then
        return [r for r in taken if r.future.set_running_or_notify_cancel()]

    def _run(self, group: list[_Request]) -> None:
        """One call for requests with equal options; results (or errors) go to each request's own Future."""
        items = [r.item for r in group]
        self.batch_sizes[len(items)] += 1
        try:
            results = self._call(items, **group[0].kwargs)
            if not isinstance(results, (list, tuple)) or len(results) != len(items):
                got = f"{len(results)} results" if isinstance(results, (list, tuple)) else type(results).__name__
                raise KilnError(f"The callable wrapped by Batcher returned {got} for {len(items)} inputs; it must "
                                "return a list with one result per input, in order.")
        except Exception as err:
            if len(group) == 1:
                group[0].future.set_exception(err)
                return
            # One bad input must not fail the others: each input alone, so each caller gets its own outcome.
            for request in group:
                self._run([request])
            return
        except BaseException as err:  # SystemExit and the like: no retry, but no caller left waiting either
            for request in group:
                request.future.set_exception(err)
            return
        for request, result in zip(group, results):
            request.future.set_result(result)


def _groups(requests: list[_Request]) -> list[list[_Request]]:
    """Requests grouped by equal keyword arguments, groups in the order of their first request."""
    groups: list[list[_Request]] = []
    for request in requests:
        group = next((g for g in groups if _same_options(g[0].kwargs, request.kwargs)), None)
        if group is None:
            groups.append([request])
        else:
            group.append(request)
    return groups


def _same_options(a: dict, b: dict) -> bool:
    """Equal values of the same types (top_k=1 and top_k=True are different requests)."""
    if a.keys() != b.keys():
        return False
    try:
        return all(a[k] is b[k] or (type(a[k]) is type(b[k]) and bool(a[k] == b[k])) for k in a)
    except Exception:  # values without one truth value (numpy arrays) share a call only when they are the same object
        return False
