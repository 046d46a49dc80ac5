"""Run one loader call in a forked child under an address-space cap and a time limit, and say how it ended.

A fuzz case must end in success or one of kiln's own errors. Running it in the pytest process could not tell a
crash (the process dies), a hang or a huge allocation (the machine swaps) from a failure; a forked child can: it
gets RLIMIT_AS = what the process maps already + ``headroom``, so an allocation sized by a hostile claim raises
MemoryError (or kills the child) instead of succeeding, and it is killed after ``timeout`` seconds.

Children are forked from a lean server (multiprocessing's forkserver, started once, with the fuzzed loaders'
modules imported: ``PRELOAD``), not from pytest: late in the full suite the pytest process holds torch, TensorFlow,
JAX and the session's models, and forking it cost ~250 ms a case instead of ~15 (the fuzz suites took 10 of the
suite's 21 minutes). The loader function travels by reference, so it must be a module-level function.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import traceback
from collections import Counter
from pathlib import Path

from kiln.errors import KilnError

HEADROOM = 1 << 30  # a loader may map 1 GiB beyond the server's child: ample for tiny files, far below a hostile claim
TIMEOUT = 20.0  # seconds; every loader here finishes a tiny file in well under one
ACCEPTED = ("ok", "kiln")
# Imported once by the fork server, so no child pays for them: what the fuzzed loaders import, then the test modules
# that define the loader functions (a child unpickles its function by module and name).
PRELOAD = ["torch", "onnx", "onnxruntime", "gguf", "tokenizers", "safetensors", "kiln", "kiln.hub", "kiln.hub.gguf",
           "kiln.artifact", "kiln.graphs.registry", "kiln.graphs.checkpoint", "kiln.runtime.engines.onnxruntime",
           "kiln.runtime.tokenizer", "kiln.runtime.generate", "kiln.runtime.image_processor",
           *sorted(p.stem for p in Path(__file__).parent.glob("test_fuzz_*.py"))]
_context = None


def _server():
    global _context
    if _context is None:
        from multiprocessing import forkserver

        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
        # Python 3.11's fork server ignores the parent's sys.path (and skips a preload it cannot import, silently):
        # it finds the test modules through PYTHONPATH, set while it starts.
        saved = os.environ.get("PYTHONPATH")
        here = Path(__file__).resolve().parent
        os.environ["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parent), *([saved] if saved else [])])
        try:
            forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
    return _context


def _mapped_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _child(fn, args, headroom: int, conn) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # onnxruntime logs its own errors to stderr; the outcome says what happened
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_mapped_bytes() + headroom, hard))
    try:
        fn(*args)
        outcome = ("ok", "")
    except KilnError as err:
        outcome = ("kiln", f"{type(err).__name__}: {err}"[:4000])
    except BaseException as err:  # noqa: BLE001 - pyo3 panics derive from BaseException: report them too
        outcome = ("other", "".join(traceback.format_exception(err))[-8000:])
    conn.send(outcome)
    conn.close()


def isolated(fn, *args, headroom: int = HEADROOM, timeout: float = TIMEOUT) -> tuple[str, str]:
    """``fn(*args)`` in a child. Returns (outcome, detail): "ok", "kiln" (a KilnError: its type and message),
    "other" (any other exception: the traceback), "crash" (a signal or no result), "hang" (killed at ``timeout``)."""
    context = _server()
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(fn, args, headroom, sender), daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            if child.is_alive():
                child.kill()
                child.join()
                return "hang", f"no result within {timeout:.0f}s"
        try:
            outcome, detail = receiver.recv()
        except EOFError:
            outcome = None
    finally:
        receiver.close()
    child.join()
    if child.exitcode is not None and child.exitcode < 0:
        return "crash", f"killed by signal {signal.Signals(-child.exitcode).name}"
    if outcome is None:
        return "crash", f"exited with status {child.exitcode} and no result"
    return outcome, detail


class Tally:
    """Outcomes per loader, so the suite can report how many cases each loader was given."""

    def __init__(self):
        self.outcomes: dict[str, Counter] = {}
        self.errors: dict[str, Counter] = {}
        self.failures: dict[str, list] = {}

    def check(self, loader: str, fn, *args, case: str = "", **options) -> tuple[str, str]:
        outcome, detail = isolated(fn, *args, **options)
        self.outcomes.setdefault(loader, Counter())[outcome] += 1
        if outcome == "kiln":
            self.errors.setdefault(loader, Counter())[detail.split(":", 1)[0]] += 1
        elif outcome not in ACCEPTED:  # collected, not raised: one run shows every distinct failure at once
            self.failures.setdefault(loader, []).append((case, outcome, detail))
        return outcome, detail

    def assert_clean(self, loader: str) -> None:
        distinct = {}
        for case, outcome, detail in self.failures.get(loader, []):
            lines = detail.strip().splitlines()
            distinct.setdefault((outcome, lines[-1] if lines else ""), (case, detail))
        shown = "\n\n".join(f"{outcome} on {case[:500]}\n{detail[-3000:]}" for (outcome, _), (case, detail)
                             in list(distinct.items())[:8])
        assert not distinct, f"{loader}: {len(distinct)} distinct failure(s):\n\n{shown}"

    def line(self, loader: str) -> str:
        c, errors = self.outcomes.get(loader, Counter()), self.errors.get(loader, Counter())
        kinds = ", ".join(f"{name} {n}" for name, n in errors.most_common())
        return (f"fuzz {loader}: {sum(c.values())} cases, {c['ok']} loaded, {c['kiln']} refused with kiln errors"
                + (f" ({kinds})" if kinds else "") + f", {sum(c.values()) - c['ok'] - c['kiln']} failures")
