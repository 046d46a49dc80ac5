"""Shared machinery of the fuzz suite (test_fuzz_weights.py, test_fuzz_configs.py): the tally, the hypothesis
settings, byte and JSON mutations.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, settings
from hypothesis import strategies as st
from isolation import Tally



TALLY = Tally()
SCALE = float(os.environ.get("KILN_FUZZ_EXAMPLES", "1"))


def fuzz(examples: int):
    """hypothesis settings for one loader: bounded examples, a per-example deadline, no example database on disk."""
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=30_000, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


@pytest.fixture
def report(record_property, capsys):
    """Call with a loader name at the end of its test: prints and records how many cases it was given."""

    def done(loader: str):
        line = TALLY.line(loader)
        record_property(f"fuzz_{loader}", dict(TALLY.outcomes.get(loader, {})))
        print(line)
        with capsys.disabled():
            print("\n" + line, end="")
        TALLY.assert_clean(loader)

    return done


class Blob(bytes):
    """File contents with a short repr, so hypothesis' report of a case stays readable."""

    def __repr__(self):
        return f"<{len(self)} bytes: {bytes(self[:160])!r}{'...' if len(self) > 160 else ''}>"


def found(test, blobs=(), **patched):
    """``test`` with the cases that found bugs in kiln's loaders as explicit examples, run whatever hypothesis draws:
    ``blobs`` as file contents, ``patched`` = (base, [changes]) as ``base`` with each change applied."""
    for blob in blobs:
        test = example(data=Blob(blob))(test)
    for base, changes in patched.values():
        for change in changes:
            test = example(data=Blob(json.dumps({**base, **change}).encode()))(test)
    return test


def scratch(tmp_path: Path) -> Path:
    """A fresh directory per example (hypothesis runs many examples inside one test)."""
    return Path(tempfile.mkdtemp(dir=tmp_path))


# --------------------------------------------------------------------------------------------------- mutations
HUGE = (2**31, 2**32 - 1, 2**40, 2**62, 2**63 - 1, 2**64 - 1)


def byte_edits(size: int, hot: list[int] | None = None):
    """Lists of edits to a file of ``size`` bytes: truncation, bit flips, overwritten runs, and 8-byte little-endian
    integers claiming huge sizes, at any position or at the ``hot`` ones (length and count fields)."""
    anywhere = st.integers(0, max(size - 1, 0))
    position = st.one_of(anywhere, st.sampled_from(hot)) if hot else anywhere
    edit = st.one_of(
        st.tuples(st.just("cut"), anywhere),
        st.tuples(st.just("flip"), position, st.integers(0, 7)),
        st.tuples(st.just("write"), position, st.binary(min_size=1, max_size=12)),
        st.tuples(st.just("u64"), position, st.sampled_from(HUGE)),
        st.tuples(st.just("u32"), position, st.sampled_from((0, 7, 2**31, 2**32 - 1))),
    )
    return st.lists(edit, min_size=1, max_size=4)


def apply_edits(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, where, *what in edits:
        if kind == "cut":
            del out[where:]
        elif not out:
            continue
        elif kind == "flip":
            out[where % len(out)] ^= 1 << what[0]
        elif kind == "write":
            i = where % len(out)
            out[i:i + len(what[0])] = what[0]
        else:
            i = where % len(out)
            out[i:i + (8 if kind == "u64" else 4)] = struct.pack("<Q" if kind == "u64" else "<I", what[0])
    return bytes(out)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                         st.sampled_from([0, -1, 2**63, 10**30, 1e308, -1e308, math.inf, -math.inf, math.nan, "",
                                          "..", "../../etc/passwd", "/etc/passwd", "a\x00b", "\ud800", [], {}]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                               st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=6)
# Texts no JSON writer makes but a broken or hostile file may hold.
RAW_JSON = [b"", b"{", b"}", b"null", b"[]", b'"text"', b"NaN", b"1" * 5000, b"\xff\xfe{}", b"\xef\xbb\xbf{}",
            b"[" * 200_000 + b"]" * 200_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
            b'{"vocab_size": ' + b"9" * 5000 + b"}", b'{"a": 1, "a": 2}', b'{"x": "\\ud800"}', b"\x00" * 64]


# JSON texts that broke every JSON loader: RecursionError, ValueError (int digits), AttributeError on non-objects.
JSON_FOUND = [b"[" * 200_000 + b"]" * 200_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000, b"1" * 5000, b"null",
              b'"text"', b"[[null]]", b"NaN"]


def paths_of(obj, prefix=()):
    """Every path (tuple of keys/indices) in a JSON value, the root included."""
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from paths_of(value, prefix + (key,))
    elif isinstance(obj, list):
        for i, value in enumerate(obj[:20]):  # long lists (vocabularies, merges): their head is enough
            yield from paths_of(value, prefix + (i,))


def json_edits(base):
    """Edits to a JSON value: set a path to another value, or delete it."""
    paths = list(paths_of(base))
    edit = st.tuples(st.sampled_from(paths), st.sampled_from(("set", "delete")), json_values)
    return st.lists(edit, min_size=1, max_size=3)


def apply_json_edits(base, edits):
    doc = copy.deepcopy(base)
    for path, action, value in edits:
        if not path:
            doc = value if action == "set" else doc
            continue
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            if action == "delete":
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            pass  # an earlier edit removed or replaced the path
    return doc


def json_file(base, targeted=None):
    """Bytes of a JSON file: ``base`` edited, ``targeted`` keys set to chosen values, raw damage, or odd texts."""
    text = json.dumps(base).encode()
    options = [st.builds(lambda e: json.dumps(apply_json_edits(base, e)).encode(), json_edits(base)),
               st.builds(apply_edits, st.just(text), byte_edits(len(text))),
               st.sampled_from(RAW_JSON)]
    if targeted:
        options.append(st.builds(lambda key, value: json.dumps({**base, key: value}).encode(),
                                 st.sampled_from(sorted(targeted)),
                                 st.one_of(*map(st.sampled_from, targeted.values()))))
    return st.one_of(*options).map(Blob)


