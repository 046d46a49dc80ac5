"""Hostile and broken files, fuzzed with hypothesis (issue 8, item 3): weights and graphs: safetensors (+ index), pytorch_model.bin, model.onnx, GGUF.

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
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from kiln import hub
from kiln.errors import CheckpointError

from fuzzing import TALLY, HUGE, JSON_FOUND, Blob, apply_edits, byte_edits, found, fuzz, json_file, scratch
from fuzzing import report  # noqa: F401  (a fixture the tests request by name)


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


def gguf_metadata(arch: str = "llama"):
    """A tiny file's metadata: LLaMA with a byte-level BPE vocabulary ("llama") or a SentencePiece one scored for its
    merges ("llama-spm", as Llama 2's and Phi-3's), or Gemma 3 with a SentencePiece one (no merges, spaces stored as
    spaces) and what llama.cpp writes for Gemma (head width, window)."""
    from gguf import GGUFValueType as T

    if arch == "llama-spm":
        metadata = {k: v for k, v in gguf_metadata("llama").items()
                    if k not in ("tokenizer.ggml.pre", "tokenizer.ggml.merges")}
        tokens = ["<unk>", "<s>", "</s>", "▁", *"abcdefghij", "▁a", "ab"]
        return {**metadata, "tokenizer.ggml.model": ("llama", T.STRING),
                "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
                "tokenizer.ggml.scores": ([-float(i) for i in range(len(tokens))], T.ARRAY, T.FLOAT32),
                "tokenizer.ggml.token_type": ([2, 3, 3] + [1] * (len(tokens) - 3), T.ARRAY, T.INT32),
                "tokenizer.ggml.bos_token_id": (1, T.UINT32), "tokenizer.ggml.eos_token_id": (2, T.UINT32),
                "tokenizer.ggml.unknown_token_id": (0, T.UINT32)}

    if arch == "gemma3":
        tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "▁", *"abcdefghij", "▁a", "  "]
        return {
            "general.architecture": ("gemma3", T.STRING), "gemma3.block_count": (2, T.UINT32),
            "gemma3.context_length": (32, T.UINT32), "gemma3.embedding_length": (32, T.UINT32),
            "gemma3.feed_forward_length": (32, T.UINT32), "gemma3.attention.head_count": (2, T.UINT32),
            "gemma3.attention.head_count_kv": (1, T.UINT32), "gemma3.rope.freq_base": (1e6, T.FLOAT32),
            "gemma3.attention.layer_norm_rms_epsilon": (1e-6, T.FLOAT32), "gemma3.attention.key_length": (16, T.UINT32),
            "gemma3.attention.value_length": (16, T.UINT32), "gemma3.attention.sliding_window": (4, T.UINT32),
            "tokenizer.ggml.model": ("llama", T.STRING), "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
            "tokenizer.ggml.scores": ([0.0] * len(tokens), T.ARRAY, T.FLOAT32),
            "tokenizer.ggml.token_type": ([3] * 4 + [1] * (len(tokens) - 4), T.ARRAY, T.INT32),
            "tokenizer.ggml.bos_token_id": (2, T.UINT32), "tokenizer.ggml.eos_token_id": (1, T.UINT32),
            "tokenizer.ggml.unknown_token_id": (3, T.UINT32), "tokenizer.ggml.add_bos_token": (True, T.BOOL),
        }
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


def write_gguf(path: Path, metadata: dict | None = None, arch: str = "llama") -> Path:
    """A tiny GGUF with F32, F16 and Q8_0 tensors: LLaMA (1 layer, hidden 32, GQA 2:1, vocab 16) or Gemma 3 (2
    layers, hidden 32, head width 16, MQA, q/k norms and Gemma's four norms, vocab 16)."""
    import logging

    import gguf

    logging.getLogger("gguf").setLevel(logging.ERROR)  # overriding general.architecture warns
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama" if arch == "llama-spm" else arch)
    for key, (value, vtype, *sub) in (metadata or gguf_metadata(arch)).items():
        writer.add_key_value(key, value, vtype, sub[0] if sub else None)
    shapes = {"token_embd": (16, 32), "blk.0.attn_norm": (32,), "blk.0.attn_q": (32, 32), "blk.0.attn_k": (16, 32),
              "blk.0.attn_v": (16, 32), "blk.0.attn_output": (32, 32), "blk.0.ffn_norm": (32,),
              "blk.0.ffn_gate": (32, 32), "blk.0.ffn_up": (32, 32), "blk.0.ffn_down": (32, 32), "output_norm": (32,)}
    if arch == "gemma3":
        layer = {"attn_norm": (32,), "attn_q": (32, 32), "attn_k": (16, 32), "attn_v": (16, 32),
                 "attn_output": (32, 32), "attn_q_norm": (16,), "attn_k_norm": (16,), "post_attention_norm": (32,),
                 "ffn_norm": (32,), "post_ffw_norm": (32,), "ffn_gate": (32, 32), "ffn_up": (32, 32),
                 "ffn_down": (32, 32)}
        shapes = {"token_embd": (16, 32), **{f"blk.{i}.{k}": v for i in range(2) for k, v in layer.items()},
                  "output_norm": (32,)}
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
    from kiln.graphs import registry

    checkpoint = hub.resolve(path)  # what `kiln export model.gguf` runs first: converts config, weights, tokenizer
    raw = hub.read_config(checkpoint)
    registry.architecture(raw).config.from_dict(raw)
    read_state_dict = __import__("kiln.graphs.checkpoint", fromlist=["read_state_dict"]).read_state_dict
    read_state_dict(checkpoint.weight_files)


def gguf_metadata_edits(arch: str = "llama"):
    """Metadata values of other types or absurd sizes, written by the real GGUF writer (a well-formed file)."""
    from gguf import GGUFValueType as T

    keys = sorted(gguf_metadata(arch))
    value = st.one_of(
        st.tuples(st.integers(0, 2**32 - 1), st.just(T.UINT32)),
        st.tuples(st.integers(-2**63, 2**63 - 1), st.just(T.INT64)),
        st.tuples(st.floats(width=32), st.just(T.FLOAT32)), st.tuples(st.booleans(), st.just(T.BOOL)),
        st.tuples(st.text(max_size=8), st.just(T.STRING)),
        st.tuples(st.lists(st.integers(0, 2**31 - 1), max_size=4), st.just(T.ARRAY), st.just(T.INT32)),
        st.tuples(st.lists(st.text(max_size=4), max_size=4), st.just(T.ARRAY), st.just(T.STRING)),
        st.just(None))  # None: the key is left out
    return st.dictionaries(st.sampled_from(keys), value, min_size=1, max_size=3)


@pytest.mark.parametrize("arch", ["llama", "llama-spm", "gemma3"])
def test_gguf(arch, tmp_path, report):
    pytest.importorskip("gguf")
    valid_path = write_gguf(tmp_path / "valid.gguf", arch=arch)
    valid, hot = valid_path.read_bytes(), length_fields(valid_path)
    _load_gguf(valid_path)  # the unedited file loads

    def edited_metadata(edits):
        metadata = gguf_metadata(arch)
        for key, value in edits.items():
            metadata.pop(key) if value is None else metadata.__setitem__(key, value)
        return metadata

    @fuzz(260 if arch == "llama" else 130)
    @given(case_=st.one_of(st.tuples(st.just("bytes"), byte_edits(len(valid), hot=hot)),
                           st.tuples(st.just("metadata"), gguf_metadata_edits(arch))))
    def case(case_):
        kind, edits = case_
        path = scratch(tmp_path) / "model.gguf"
        if kind == "bytes":
            path.write_bytes(apply_edits(valid, edits))
        else:
            try:
                write_gguf(path, edited_metadata(edits), arch=arch)
            except (ValueError, TypeError, OverflowError, struct.error):
                return  # the writer itself refuses this value
        TALLY.check(f"gguf ({arch})", _load_gguf, path, case=f"{kind}: {edits!r}")

    from gguf import GGUFValueType as T

    for edits in () if arch != "llama" else ({"tokenizer.ggml.eos_token_id": ("", T.STRING)}, {"tokenizer.ggml.merges": (True, T.BOOL)},
                  {"general.architecture": ([1, 2], T.ARRAY, T.INT32)},
                  {"tokenizer.ggml.bos_token_id": (0.0, T.FLOAT32)}, {"llama.attention.head_count_kv": (True, T.BOOL)},
                  {"llama.attention.head_count_kv": (0.0, T.FLOAT32)},
                  {"tokenizer.ggml.tokens": (7, T.UINT32)}):  # each broke a loader before issue 8
        case = example(case_=("metadata", edits))(case)
    for edits in () if arch != "gemma3" else (
            {"gemma3.attention.sliding_window": (0, T.UINT32)}, {"gemma3.attention.sliding_window": ("4", T.STRING)},
            {"tokenizer.ggml.token_type": ([9], T.ARRAY, T.INT32)}, {"tokenizer.ggml.unknown_token_id": (99, T.UINT32)},
            {"gemma3.attention.key_length": (None)}):
        case = example(case_=("metadata", edits))(case)
    if arch == "gemma3":  # a tensor dimension of 0 made gguf's dequantize fail in a reshape
        case = example(case_=("bytes", [("u32", 1349, 0)]))(case)
    case()
    report(f"gguf ({arch})")


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


