"""Run one loader call in a forked child under an address-space cap and a time limit, and say how it ended.

A fuzz case must end in success or one of kiln's own errors. Running it in the pytest process could not tell a
crash (the process dies), a hang or a huge allocation (the machine swaps) from a failure; a forked child can: it
gets RLIMIT_AS = what the process maps already + ``headroom``, so an allocation sized by a hostile claim raises
MemoryError (or kills the child) instead of succeeding, and it is killed after ``timeout`` seconds. A fork costs
~10 ms here, so hundreds of cases stay cheap.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import time
import traceback
from collections import Counter

from kiln.errors import KilnError

HEADROOM = 1 << 30  # a loader may map 1 GiB beyond the parent: ample for tiny files, far below a hostile claim
TIMEOUT = 20.0  # seconds; every loader here finishes a tiny file in well under one
ACCEPTED = ("ok", "kiln")


def _mapped_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def isolated(fn, *args, headroom: int = HEADROOM, timeout: float = TIMEOUT) -> tuple[str, str]:
    """``fn(*args)`` in a child. Returns (outcome, detail): "ok", "kiln" (a KilnError: its type and message),
    "other" (any other exception: the traceback), "crash" (a signal or no result), "hang" (killed at ``timeout``)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
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
            os.write(write_end, json.dumps(outcome).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    deadline, chunks = time.monotonic() + timeout, []
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return "hang", f"no result within {timeout:.0f}s"
            if select.select([read_end], [], [], left)[0]:
                chunk = os.read(read_end, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "crash", f"killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
    if not chunks:
        return "crash", f"exited with status {os.waitstatus_to_exitcode(status)} and no result"
    outcome, detail = json.loads(b"".join(chunks))
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
