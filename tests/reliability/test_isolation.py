"""The fuzz harness itself (isolation.py): each way a loader can end is told apart, so a fuzz case can fail."""

from __future__ import annotations

import os
import signal
import time

from isolation import isolated

from kiln.errors import CheckpointError


def _fine():
    return 1


def _refuses():
    raise CheckpointError("refused")


def _raises():
    raise ValueError("deep inside a library")


def _crashes():
    os.kill(os.getpid(), signal.SIGSEGV)


def _hangs():
    time.sleep(60)


def _allocates():
    return bytearray(2 << 30)  # 2 GiB, beyond the cap below


def test_every_ending_is_told_apart():
    assert isolated(_fine) == ("ok", "")
    assert isolated(_refuses) == ("kiln", "CheckpointError: refused")
    outcome, detail = isolated(_raises)
    assert outcome == "other" and "ValueError: deep inside a library" in detail
    assert isolated(_crashes) == ("crash", "killed by signal SIGSEGV")
    started = time.monotonic()
    assert isolated(_hangs, timeout=1.0) == ("hang", "no result within 1s")
    assert time.monotonic() - started < 10
    outcome, detail = isolated(_allocates, headroom=256 << 20)
    assert outcome == "other" and "MemoryError" in detail
