"""Hostile and broken files, fuzzed with hypothesis over every loader kiln has (issue 8, item 3).

Each case writes a damaged or adversarial file (truncated, bit-flipped, a length field claiming a huge size, a JSON
value of the wrong type or size, deep nesting, a path that escapes the artifact) and runs the loader in a forked
child under an address-space cap and a time limit (``isolation.py``): the case passes when the loader succeeds or
raises one of kiln's own errors (a KilnError subclass); another exception, a crash, a hang or an allocation beyond
the cap fails it. Cases are derandomized (the same on every run, so CI is repeatable) and counted per loader; the
counts are printed and recorded as junit properties. ``KILN_FUZZ_EXAMPLES=N`` multiplies the cases for a long run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from isolation import Tally

from kiln import hub
from kiln.errors import CheckpointError, KilnError

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


# ------------------------------------------------------------------------------------------------- safetensors
def _read_state_dict(path):
    from kiln.graphs.checkpoint import read_state_dict

    read_state_dict([path])


def safetensors_bytes() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.float16),
                 "c": torch.arange(4, dtype=torch.int64), "d": torch.zeros(2, 2, dtype=torch.bfloat16)},
                metadata={"format": "pt"})


def safetensors_claims(valid: bytes):
    """Files whose header claims more than the file holds: data offsets, shapes, or the header length itself."""
    n = struct.unpack("<Q", valid[:8])[0]
    header, body = json.loads(valid[8:8 + n]), valid[8 + n:]

    def claim(name, field, value, length_field):
        h = copy.deepcopy(header)
        if field == "data_offsets":
            h[name]["data_offsets"] = [h[name]["data_offsets"][0], value]
        elif field == "shape":
            h[name]["shape"] = [value, 1]
        else:
            h[name]["dtype"] = value
        raw = json.dumps(h).encode()
        return struct.pack("<Q", length_field if length_field is not None else len(raw)) + raw + body

    tensors = sorted(k for k in header if k != "__metadata__")
    return st.builds(claim, st.sampled_from(tensors), st.sampled_from(("data_offsets", "shape", "dtype")),
                     st.one_of(st.sampled_from(HUGE), st.integers(0, 1 << 20), st.sampled_from(("F64", "X9", ""))),
                     st.one_of(st.none(), st.sampled_from((0, 7, n + 1, len(valid), 100_000_001, *HUGE))))


def test_safetensors(tmp_path, report):
    valid = safetensors_bytes()
    n = struct.unpack("<Q", valid[:8])[0]

    @fuzz(250)
    @given(data=st.one_of(st.builds(apply_edits, st.just(valid), byte_edits(len(valid), hot=list(range(0, 8 + n, 4)))),
                          safetensors_claims(valid)).map(Blob))
    def case(data):
        path = scratch(tmp_path) / "model.safetensors"
        path.write_bytes(data)
        TALLY.check("safetensors", _read_state_dict, path, case=repr(data))

    case()
    report("safetensors")


def test_safetensors_size_claim_is_refused_before_allocation(tmp_path):
    """A header claiming 1 TiB of data in a 200-byte file: refused with kiln's error, under a 256 MiB cap."""
    valid = safetensors_bytes()
    n = struct.unpack("<Q", valid[:8])[0]
    header = json.loads(valid[8:8 + n])
    header["a"] = {"dtype": "F32", "shape": [1 << 38], "data_offsets": [0, 1 << 40]}
    raw = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + valid[8 + n:])
    outcome, detail = TALLY.check("safetensors-size-claim", _read_state_dict, path, case="1 TiB claim",
                                  headroom=256 << 20)
    assert outcome == "kiln" and detail.startswith("CheckpointError") and "safetensors" in detail, detail


def _load_index(directory):
    hub.find_weights(directory)


def test_safetensors_index(tmp_path, report):
    base = {"metadata": {"total_size": 64}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                           "b": "model-00002-of-00002.safetensors"}}
    targeted = {"weight_map": [{"a": "../outside.safetensors"}, {"a": "/etc/passwd"}, {"a": 5}, {"a": "a\x00b"},
                               {"a": ""}, {"a": "."}, [], "x", None]}

    @fuzz(120)
    @given(data=json_file(base, targeted))
    def case(data):
        directory = scratch(tmp_path)
        for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
            (directory / name).write_bytes(b"")
        (directory / "model.safetensors.index.json").write_bytes(data)
        TALLY.check("safetensors-index", _load_index, directory, case=repr(data))

    found(case, JSON_FOUND)()
    report("safetensors-index")


# ------------------------------------------------------------------------------------------ pytorch_model.bin
def test_pytorch_bin(tmp_path, report):
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 2)}, buffer)
    valid = buffer.getvalue()

    @fuzz(80)
    @given(edits=byte_edits(len(valid)))
    def case(edits):
        path = scratch(tmp_path) / "pytorch_model.bin"
        path.write_bytes(apply_edits(valid, edits))
        TALLY.check("pytorch_model.bin", _read_state_dict, path, case=repr(edits))

    case()
    report("pytorch_model.bin")


def test_pytorch_bin_goes_through_weights_only(tmp_path, monkeypatch):
    """The one pickle kiln reads at all: only through torch.load(weights_only=True), which refuses code."""
    import torch

    from kiln.graphs.checkpoint import read_state_dict

    calls, real = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", spy)
    assert set(read_state_dict([tmp_path / "pytorch_model.bin"])) == {"a"}
    assert calls and all(kwargs.get("weights_only") is True for kwargs in calls)

    class Exploit:  # what a hostile pickle does: run a command when loaded
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    monkeypatch.setattr(torch, "load", real)
    torch.save({"a": Exploit()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_state_dict([tmp_path / "pytorch_model.bin"])
    assert not (tmp_path / "pwned").exists()


def test_no_loader_unpickles():
    """No module of kiln calls pickle, numpy's allow_pickle, or torch.load without weights_only=True."""
    import re

    root = Path(__file__).resolve().parents[2] / "kiln"
    offenders = []
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for pattern in (r"\bimport pickle\b", r"\bpickle\.load", r"allow_pickle\s*=\s*True", r"\bjoblib\b",
                        r"\bdill\b", r"torch\.load\((?![^)]*weights_only=True)[^)]*\)"):
            offenders += [f"{path.relative_to(root.parent)}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------------------ ONNX
def _load_engine(path):
    from kiln.runtime.engines.onnxruntime import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(path, threads=1)
    feed = {}
    for info in engine.inputs():
        shape = [d if isinstance(d, int) and 0 <= d <= 16 else 2 for d in info.shape]
        feed[info.name] = np.ones(shape, dtype=np.int64)
    engine.run(feed)


def onnx_edits(model):
    """Structural edits of a parsed ModelProto: what a bit flip in the graph (not the weights) can do, and worse."""
    nodes = len(model.graph.node)
    inits = len(model.graph.initializer)
    return st.lists(st.one_of(
        st.tuples(st.just("op_type"), st.integers(0, nodes - 1), st.sampled_from(("Gather", "Reshape", "MatMul", "",
                                                                                  "Attention", "NoSuchOp", "Loop")),
                  st.none()),
        st.tuples(st.just("domain"), st.integers(0, nodes - 1), st.sampled_from(("com.microsoft", "x.y", "ai.onnx.ml")),
                  st.none()),
        st.tuples(st.just("drop_node"), st.integers(0, nodes - 1), st.none(), st.none()),
        st.tuples(st.just("input"), st.integers(0, nodes - 1), st.sampled_from(("", "nowhere", "input_ids")),
                  st.none()),
        st.tuples(st.just("dims"), st.integers(0, inits - 1), st.sampled_from((2**40, 2**62, 0, 3)), st.none()),
        st.tuples(st.just("dtype"), st.integers(0, inits - 1), st.integers(0, 25), st.none()),
        st.tuples(st.just("external"), st.integers(0, inits - 1),
                  st.sampled_from(("../outside.bin", "/etc/passwd", "model.onnx", "missing.bin", "")),
                  st.sampled_from((None, 2**40, 2**63 - 1))),
        st.tuples(st.just("attribute"), st.integers(0, nodes - 1), st.sampled_from((2**62, -(2**62), 0, -1)),
                  st.none()),
        st.tuples(st.just("opset"), st.none(), st.sampled_from((1, 9, 22, 30, 10_000)), st.none()),
        st.tuples(st.just("ir_version"), st.none(), st.sampled_from((0, 3, 99)), st.none()),
        st.tuples(st.just("input_type"), st.integers(0, 2), st.sampled_from((0, 1, 8, 9, 16, 99)), st.none()),
    ), min_size=1, max_size=3)


def apply_onnx_edits(model, edits) -> bytes:
    from onnx import TensorProto

    m = copy.deepcopy(model)
    g = m.graph
    for kind, index, value, extra in edits:
        if kind in ("op_type", "domain", "drop_node", "input", "attribute") and index >= len(g.node):
            continue
        if kind == "op_type":
            g.node[index].op_type = value
        elif kind == "domain":
            g.node[index].domain = value
        elif kind == "drop_node":
            del g.node[index]
        elif kind == "input" and g.node[index].input:
            g.node[index].input[0] = value
        elif kind == "dims":
            g.initializer[index].dims[:] = [value, *g.initializer[index].dims[1:]]
        elif kind == "dtype":
            g.initializer[index].data_type = value
        elif kind == "external":
            tensor = g.initializer[index]
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, v in (("location", value), ("offset", "0"), ("length", str(extra) if extra else None)):
                if v is not None:
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, v
        elif kind == "attribute":
            for attribute in g.node[index].attribute:
                if attribute.type == attribute.INT:
                    attribute.i = value
                elif attribute.type == attribute.INTS and attribute.ints:
                    attribute.ints[0] = value
        elif kind == "opset":
            m.opset_import[0].version = value
        elif kind == "ir_version":
            m.ir_version = value
        elif kind == "input_type" and index < len(g.input):
            g.input[index].type.tensor_type.elem_type = value
    return m.SerializeToString()


def test_onnx_model(artifacts, tmp_path, report):
    import onnx

    source = artifacts("bert", "feature-extraction") / "model.onnx"
    valid = source.read_bytes()
    model = onnx.load_from_string(valid)
    graph_start = len(valid) - 4096  # the graph structure mostly sits after the initializers' raw bytes
    (tmp_path / "outside.bin").write_bytes(b"\x01" * 64)

    @fuzz(140)
    @given(data=st.one_of(st.builds(apply_edits, st.just(valid), byte_edits(len(valid), hot=list(range(0, 64)) + list(
                              range(graph_start, len(valid), 7)))),
                          st.builds(apply_onnx_edits, st.just(model), onnx_edits(model))).map(Blob))
    def case(data):
        directory = scratch(tmp_path)
        (directory / "model.onnx").write_bytes(data)
        TALLY.check("model.onnx", _load_engine, directory / "model.onnx", case=repr(data))

    case()
    report("model.onnx")


# ------------------------------------------------------------------------------------------------------ GGUF
def _tokens():
    return [*"abcdefghijkl", "ab", "cd", "<s>", "</s>"]


def gguf_metadata():
    from gguf import GGUFValueType as T

    return {
        "general.architecture": ("llama", T.STRING), "llama.block_count": (1, T.UINT32),
        "llama.context_length": (32, T.UINT32), "llama.embedding_length": (32, T.UINT32),
        "llama.feed_forward_length": (32, T.UINT32), "llama.attention.head_count": (2, T.UINT32),
        "llama.attention.head_count_kv": (1, T.UINT32), "llama.rope.freq_base": (10000.0, T.FLOAT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, T.FLOAT32), "llama.vocab_size": (16, T.UINT32),
        "llama.rope.dimension_count": (16, T.UINT32), "tokenizer.ggml.model": ("gpt2", T.STRING),
        "tokenizer.ggml.pre": ("gpt2", T.STRING), "tokenizer.ggml.tokens": (_tokens(), T.ARRAY, T.STRING),
        "tokenizer.ggml.token_type": ([1] * 14 + [3, 3], T.ARRAY, T.INT32),
        "tokenizer.ggml.merges": (["a b", "c d"], T.ARRAY, T.STRING), "tokenizer.ggml.bos_token_id": (14, T.UINT32),
        "tokenizer.ggml.eos_token_id": (15, T.UINT32), "tokenizer.ggml.add_bos_token": (True, T.BOOL),
        "tokenizer.chat_template": ("{{ messages }}", T.STRING),
    }


def write_gguf(path: Path, metadata: dict | None = None) -> Path:
    """A tiny LLaMA GGUF (1 layer, hidden 32, GQA 2:1, vocab 16) with F32, F16 and Q8_0 tensors."""
    import logging

    import gguf

    logging.getLogger("gguf").setLevel(logging.ERROR)  # overriding general.architecture warns
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype, *sub) in (metadata or gguf_metadata()).items():
        writer.add_key_value(key, value, vtype, sub[0] if sub else None)
    shapes = {"token_embd": (16, 32), "blk.0.attn_norm": (32,), "blk.0.attn_q": (32, 32), "blk.0.attn_k": (16, 32),
              "blk.0.attn_v": (16, 32), "blk.0.attn_output": (32, 32), "blk.0.ffn_norm": (32,),
              "blk.0.ffn_gate": (32, 32), "blk.0.ffn_up": (32, 32), "blk.0.ffn_down": (32, 32), "output_norm": (32,)}
    for name, shape in shapes.items():
        data = rng.standard_normal(shape).astype(np.float32)
        if name == "blk.0.attn_q":
            writer.add_tensor(f"{name}.weight", gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(f"{name}.weight", data.astype(np.float16) if name == "blk.0.ffn_up" else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def length_fields(path: Path) -> list[int]:
    """Byte offsets of every count, length, type, dimension and offset field in a GGUF file's header."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    base = reader.data.ctypes.data
    offsets = set()
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        for part in field.parts:
            if part.dtype.itemsize in (4, 8) and part.dtype.kind == "u" and part.size:
                offsets.update(part.ctypes.data - base + i * part.dtype.itemsize for i in range(min(part.size, 4)))
    return sorted(offsets)


def _load_gguf(path):
    from kiln import gguf
    from kiln.graphs.llama.config import LlamaConfig

    checkpoint = hub.resolve(path)  # what `kiln export model.gguf` runs first
    LlamaConfig.from_dict(hub.read_config(checkpoint))
    _read_state_dict(path)
    out = path.parent / "tokenizer"
    out.mkdir()
    gguf.write_tokenizer(path, out)


def gguf_metadata_edits():
    """Metadata values of other types or absurd sizes, written by the real GGUF writer (a well-formed file)."""
    from gguf import GGUFValueType as T

    keys = sorted(gguf_metadata())
    value = st.one_of(
        st.tuples(st.integers(0, 2**32 - 1), st.just(T.UINT32)),
        st.tuples(st.integers(-2**63, 2**63 - 1), st.just(T.INT64)),
        st.tuples(st.floats(width=32), st.just(T.FLOAT32)), st.tuples(st.booleans(), st.just(T.BOOL)),
        st.tuples(st.text(max_size=8), st.just(T.STRING)),
        st.tuples(st.lists(st.integers(0, 2**31 - 1), max_size=4), st.just(T.ARRAY), st.just(T.INT32)),
        st.tuples(st.lists(st.text(max_size=4), max_size=4), st.just(T.ARRAY), st.just(T.STRING)),
        st.just(None))  # None: the key is left out
    return st.dictionaries(st.sampled_from(keys), value, min_size=1, max_size=3)


def test_gguf(tmp_path, report):
    pytest.importorskip("gguf")
    valid_path = write_gguf(tmp_path / "valid.gguf")
    valid, hot = valid_path.read_bytes(), length_fields(valid_path)

    def edited_metadata(edits):
        metadata = gguf_metadata()
        for key, value in edits.items():
            metadata.pop(key) if value is None else metadata.__setitem__(key, value)
        return metadata

    @fuzz(260)
    @given(case_=st.one_of(st.tuples(st.just("bytes"), byte_edits(len(valid), hot=hot)),
                           st.tuples(st.just("metadata"), gguf_metadata_edits())))
    def case(case_):
        kind, edits = case_
        path = scratch(tmp_path) / "model.gguf"
        if kind == "bytes":
            path.write_bytes(apply_edits(valid, edits))
        else:
            try:
                write_gguf(path, edited_metadata(edits))
            except (ValueError, TypeError, OverflowError, struct.error):
                return  # the writer itself refuses this value
        TALLY.check("gguf", _load_gguf, path, case=f"{kind}: {edits!r}")

    from gguf import GGUFValueType as T

    for edits in ({"tokenizer.ggml.eos_token_id": ("", T.STRING)}, {"tokenizer.ggml.merges": (True, T.BOOL)},
                  {"general.architecture": ([1, 2], T.ARRAY, T.INT32)},
                  {"tokenizer.ggml.bos_token_id": (0.0, T.FLOAT32)}, {"llama.attention.head_count_kv": (True, T.BOOL)},
                  {"llama.attention.head_count_kv": (0.0, T.FLOAT32)},
                  {"tokenizer.ggml.tokens": (7, T.UINT32)}):  # each broke a loader before issue 8
        case = example(case_=("metadata", edits))(case)
    case()
    report("gguf")


def test_gguf_size_claims_are_refused_quickly(tmp_path):
    """Every count and length field set to 2**62 in turn: each refused with kiln's error, fast, under a small cap.
    (gguf's reader walks an array element by element, so a claimed 2**62 elements spins without a pre-check.)"""
    pytest.importorskip("gguf")
    valid_path = write_gguf(tmp_path / "valid.gguf")
    valid = valid_path.read_bytes()
    for offset in length_fields(valid_path):
        path = tmp_path / f"claim-{offset}.gguf"
        path.write_bytes(apply_edits(valid, [("u64", offset, 2**62)]))
        TALLY.check("gguf-size-claims", _load_gguf, path, case=f"2**62 at byte {offset}", headroom=256 << 20,
                    timeout=10)
        path.unlink()
    TALLY.assert_clean("gguf-size-claims")


# ------------------------------------------------------------------------------------------------ config.json
CONFIGS = {
    "bert": {"model_type": "bert", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 37, "hidden_act": "gelu", "max_position_embeddings": 64,
             "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0, "position_embedding_type": "absolute",
             "id2label": {"0": "NEG", "1": "POS"}, "problem_type": "single_label_classification"},
    "distilbert": {"model_type": "distilbert", "vocab_size": 100, "dim": 32, "n_layers": 2, "n_heads": 4,
                   "hidden_dim": 37, "activation": "gelu", "max_position_embeddings": 64, "pad_token_id": 0},
    "llama": {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
              "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64},
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": 0,
              "sliding_window": 16},
    "qwen2": {"model_type": "qwen2", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "use_sliding_window": True,
              "sliding_window": 8},
    "gpt2": {"model_type": "gpt2", "vocab_size": 100, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4,
             "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "bos_token_id": 1,
             "eos_token_id": 1},
    "vit": {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 37, "image_size": 32, "patch_size": [8, 8], "num_channels": 3,
            "id2label": {"0": "cat", "1": "dog"}, "qkv_bias": True, "pooler_output_size": 16},
}
# Values that break a careless reader: wrong types, absurd sizes, non-finite floats, empty containers.
ABSURD = [None, True, "32", "", [], {}, [32], {"a": 1}, 0, -1, -8, 2**24, 2**24 + 1, 2**31, 2**63, 10**30,
          0.5, 32.0, 1e308, math.inf, -math.inf, math.nan, "\ud800"]


def _load_config(directory):
    from kiln.graphs import registry
    from kiln.graphs.bert.config import BertConfig
    from kiln.graphs.gpt2.config import GPT2Config
    from kiln.graphs.llama.config import LlamaConfig
    from kiln.graphs.vit.config import ViTConfig

    raw = hub.read_config(directory)
    package = registry.package_for(raw)
    for task in registry.architecture(raw).TASKS:
        registry.check_task(raw, task)
    config = {"bert": BertConfig, "llama": LlamaConfig, "gpt2": GPT2Config, "vit": ViTConfig}[package].from_dict(raw)
    # What the exporter derives from the config next: sizes must be numbers by now.
    for name in ("num_hidden_layers", "hidden_size", "head_dim", "dim", "kv_heads", "max_position_embeddings",
                 "max_sequence_length", "sequence_length", "num_labels", "intermediate_size"):
        value = getattr(config, name, None)
        assert value is None or (isinstance(value, int) and value > 0), (name, value)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_config_json(arch, tmp_path, report):
    base = CONFIGS[arch]
    targeted = {key: ABSURD for key in base if key != "model_type"}
    targeted["model_type"] = [None, 5, [], "BERT", "gpt-2", "llama\x00", *CONFIGS]

    @fuzz(110)
    @given(data=json_file(base, targeted))
    def case(data):
        directory = scratch(tmp_path)
        (directory / "config.json").write_bytes(data)
        TALLY.check(f"config.json ({arch})", _load_config, directory, case=repr(data))

    changes = {"gpt2": [{"activation_function": {}}],
               "llama": [{"head_dim": []}, {"head_dim": {}}, {"rms_norm_eps": []}, {"rope_scaling": 5.0}],
               "qwen2": [{"rope_parameters": ["x"]}, {"rope_parameters": 7}]}.get(arch, [])
    found(case, JSON_FOUND, config=(base, changes))()
    report(f"config.json ({arch})")


# --------------------------------------------------------------------------------------- tokenizer.json & co
def _load_tokenizer(directory):
    from kiln.runtime.generation import chat_template_from
    from kiln.runtime.tokenizer import Tokenizer

    chat_template_from(directory)  # text generation reads tokenizer_config.json for its chat template
    tok = Tokenizer.from_dir(directory, max_length=16)
    batch = tok(["hello world, kiln runs fast", "a"])
    tok.decode(batch.input_ids[0])
    tok(["paris"], ["is a city"], truncation=True)


@pytest.mark.parametrize("file", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
def test_tokenizer_files(file, artifacts, tmp_path, report):
    source = artifacts("bert", "feature-extraction")
    if not (source / "special_tokens_map.json").is_file():
        (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]", "mask_token": "[MASK]"}))
        source_files = {**{p.name: p for p in source.glob("tokenizer*.json")},
                        "special_tokens_map.json": tmp_path / "special_tokens_map.json"}
    else:
        source_files = {p.name: p for p in (*source.glob("tokenizer*.json"), source / "special_tokens_map.json")}
    base = json.loads(source_files[file].read_text())
    targeted = {"tokenizer_config.json": {"model_max_length": ABSURD, "pad_token": ABSURD, "padding_side": ABSURD,
                                          "chat_template": ABSURD + [[{"name": "default"}],
                                                                     [{"name": 1, "template": 2}],
                                                                     [{"name": "default", "template": "{{ x }}"}]],
                                          "mask_token": ABSURD, "clean_up_tokenization_spaces": ABSURD},
                "special_tokens_map.json": {"pad_token": ABSURD, "unk_token": ABSURD},
                "tokenizer.json": {"model": ABSURD, "truncation": ABSURD, "padding": ABSURD, "normalizer": ABSURD,
                                   "pre_tokenizer": ABSURD, "post_processor": ABSURD, "decoder": ABSURD,
                                   "added_tokens": ABSURD}}[file]

    @fuzz({"tokenizer.json": 150, "tokenizer_config.json": 60, "special_tokens_map.json": 40}[file])
    @given(data=json_file(base, targeted))
    def case(data):
        directory = scratch(tmp_path)
        for name, path in source_files.items():
            os.link(path, directory / name) if name != file else (directory / name).write_bytes(data)
        TALLY.check(file, _load_tokenizer, directory, case=repr(data))

    changes = {"tokenizer_config.json": [{"model_max_length": -5}, {"pad_token": 5}, {"padding_side": []},
                                         {"chat_template": [{"name": 1}]}, {"chat_template": 7}]}.get(file, [])
    found(case, JSON_FOUND, file=(base, changes))()
    report(file)


# -------------------------------------------------------------------------------------------------- kiln.json
def _load_artifact(directory):
    import kiln
    from kiln.artifact import load_manifest, verify

    load_manifest(directory)
    try:
        verify(directory)
    except KilnError:
        pass  # a manifest edit usually breaks verification; the pipeline below must still fail cleanly or work
    pipe = kiln.pipeline("feature-extraction", directory, threads=1)
    pipe(["hello world", "kiln runs fast"], pooling="mean")


def test_kiln_json(artifacts, tmp_path, report):
    source = artifacts("bert", "feature-extraction")
    base = json.loads((source / "kiln.json").read_text())
    names = ["../outside.onnx", "/etc/passwd", "a\x00b", "", ".", "..", "engines/../../x", "model.onnx/", 5, None,
             ["model.onnx"], {"a": 1}, "\ud800"]
    targeted = {"format_version": [None, 0, 2, "1", 1.0, True, 2**63, [1]], "model": names,
                "task": [None, 5, "", "text-classification", ["feature-extraction"]],
                "inputs": ABSURD, "outputs": ABSURD, "max_sequence_length": ABSURD,
                "files": [{name: "0" * 64} for name in names if isinstance(name, str)] + [[], "x", 5, None,
                                                                                            {"model.onnx": 5}],
                "dynamic_axes": [{"batch": {"min": 1, "max": v}, "sequence": {"min": 1, "max": 64}} for v in ABSURD]
                + [{"batch": v} for v in ABSURD[:6]] + ABSURD}
    (tmp_path / "outside.onnx").write_bytes((source / "model.onnx").read_bytes())

    @fuzz(160)
    @given(data=json_file(base, targeted))
    def case(data):
        directory = scratch(tmp_path) / "art"
        directory.mkdir()
        for path in source.iterdir():
            if path.name != "kiln.json":
                os.link(path, directory / path.name)  # hard links: a symlink would itself point outside
        (directory / "kiln.json").write_bytes(data)
        TALLY.check("kiln.json", _load_artifact, directory, case=repr(data))
        shutil.rmtree(directory.parent)

    changes = [{"model": None}, {"model": "a\x00b"}, {"max_sequence_length": {}}, {"max_sequence_length": -1},
               {"files": []}, {"dynamic_axes": {"batch": 5}}]
    found(case, JSON_FOUND, manifest=(base, changes))()
    report("kiln.json")


# ------------------------------------------------------------------------------------ preprocessor_config.json
def _load_image_processor(directory):
    from kiln.runtime.image_processor import ImageProcessor

    processor = ImageProcessor.from_dir(directory)
    sizes = [v for d in (processor.size or {}, processor.crop_size or {}) for v in d.values()]
    if all(v <= 64 for v in sizes):  # run it too, where the output stays small
        processor([np.full((8, 8, 3), 128, dtype=np.uint8)])


def test_preprocessor_config(tmp_path, report):
    pytest.importorskip("PIL")
    base = {"do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2, "do_center_crop": True,
            "crop_size": {"height": 24, "width": 24}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "do_convert_rgb": True, "image_processor_type": "ViTImageProcessor"}
    sizes = [{"height": v, "width": 8} for v in ABSURD] + [{"shortest_edge": v} for v in ABSURD] + ABSURD
    targeted = {"size": sizes, "crop_size": sizes, "resample": ABSURD, "rescale_factor": ABSURD,
                "image_mean": ABSURD + [[math.nan] * 3, [1, 2]], "image_std": ABSURD + [[0, 1, 1], [math.inf] * 3]}

    @fuzz(150)
    @given(data=json_file(base, targeted))
    def case(data):
        directory = scratch(tmp_path)
        (directory / "preprocessor_config.json").write_bytes(data)
        TALLY.check("preprocessor_config.json", _load_image_processor, directory, case=repr(data))

    changes = [{"resample": {}}, {"image_mean": [1, 2]}, {"image_std": [1, 2]}, {"rescale_factor": math.nan}]
    found(case, JSON_FOUND, config=(base, changes))()
    report("preprocessor_config.json")


# ---------------------------------------------------------------------------------- generation_config.json
def _load_generation_config(directory):
    from kiln.runtime.generation import GenerationConfig

    GenerationConfig.from_artifact(directory)


def test_generation_config(tmp_path, report):
    base = {"bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": 0, "do_sample": True, "temperature": 0.7,
            "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1, "max_new_tokens": 32, "max_length": 64}
    targeted = {key: ABSURD for key in base}

    @fuzz(120)
    @given(data=json_file(base, targeted))
    def case(data):
        directory = scratch(tmp_path)
        (directory / "generation_config.json").write_bytes(data)
        TALLY.check("generation_config.json", _load_generation_config, directory, case=repr(data))

    found(case, JSON_FOUND)()
    report("generation_config.json")
