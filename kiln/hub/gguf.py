"""GGUF (llama.cpp) checkpoints -> a Hugging Face style checkpoint directory, converted once.

A GGUF file is config, weights and tokenizer in one: metadata keys (``llama.block_count``, ``tokenizer.ggml.tokens``)
and tensors under llama.cpp's names (``blk.0.attn_q.weight``), often block-quantized (Q4_1, Q8_0, ...). :func:`convert`
writes what a Hugging Face checkpoint directory would hold (config.json, model.safetensors, tokenizer.json and
tokenizer_config.json, generation_config.json) into kiln's cache, so the references and the exporter need not know
GGUF: quantized weights are dequantized to float32 (the exported graph is fp32 like any other). The tensor names are
mapped per llama.cpp architecture (``TENSORS``).

Light like ``kiln.hub``: numpy, ``gguf``, ``safetensors`` and ``tokenizers`` are imported lazily, never torch or
transformers.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from pathlib import Path

from kiln.errors import CheckpointError, require

log = logging.getLogger("kiln")

# general.architecture -> (HF model_type, transformers class). Mistral GGUFs also say "llama" (llama.cpp runs them as
# one architecture). Qwen3 GGUFs name the head width (`qwen3.attention.key_length`), which transformers' GGUF loader
# ignores (it takes Qwen3Config's default, 128, right for the released sizes); kiln reads it, or the q tensor's rows.
# Gemma: llama.cpp stores each RMSNorm weight plus one (its norm multiplies by the weight, Gemma's by 1 + weight):
# kiln subtracts it again, as transformers' GGUF loader does. A Gemma GGUF omits what llama.cpp hard-codes, which
# kiln (like transformers' loader) fills from transformers' config defaults: query_pre_attn_scalar (256), the
# local/global layer pattern (Gemma 2: alternating; Gemma 3: every sixth global) and Gemma 3's local RoPE base (10k).
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                 "qwen3": ("qwen3", "Qwen3ForCausalLM"), "gemma2": ("gemma2", "Gemma2ForCausalLM"),
                 "gemma3": ("gemma3_text", "Gemma3ForCausalLM"), "phi3": ("phi3", "Phi3ForCausalLM")}
GEMMA = {"gemma2", "gemma3"}
# Phi-3: llama.cpp keeps the fused q/k/v and gate/up matrices (kiln's phi3 entry splits them on load), rotates
# rope.dimension_count of each head (partial_rotary_factor), and stores LongRoPE's factors as the tensors
# rope_factors_short/long (read into the config, as the original config.json has them; transformers' GGUF loader
# drops them and runs default RoPE).
ROPE_FACTORS = ("rope_factors_short.weight", "rope_factors_long.weight")
PERMUTED_QK = {"llama"}  # llama.cpp's converter reorders q/k rows for these only (LlamaModel.permute)
# Per architecture: llama.cpp tensor name (without .weight/.bias) -> HF name; '{i}' is the layer index.
LLAMA_TENSORS = {
    "token_embd": "model.embed_tokens",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
    "output_norm": "model.norm",
    "output": "lm_head",
}
QK_NORMS = {"blk.{i}.attn_q_norm": "model.layers.{i}.self_attn.q_norm",
            "blk.{i}.attn_k_norm": "model.layers.{i}.self_attn.k_norm"}
GEMMA_TENSORS = {**LLAMA_TENSORS, **QK_NORMS,  # ffn_norm is the norm before the MLP; two more after each block
                 "blk.{i}.post_attention_norm": "model.layers.{i}.post_attention_layernorm",
                 "blk.{i}.ffn_norm": "model.layers.{i}.pre_feedforward_layernorm",
                 "blk.{i}.post_ffw_norm": "model.layers.{i}.post_feedforward_layernorm"}
PHI3_TENSORS = {**{k: v for k, v in LLAMA_TENSORS.items() if k not in ("blk.{i}.attn_q", "blk.{i}.attn_k",
                                                                          "blk.{i}.attn_v", "blk.{i}.ffn_gate")},
                "blk.{i}.attn_qkv": "model.layers.{i}.self_attn.qkv_proj",
                "blk.{i}.ffn_up": "model.layers.{i}.mlp.gate_up_proj"}
TENSORS = {"llama": LLAMA_TENSORS, "qwen2": LLAMA_TENSORS, "qwen3": {**LLAMA_TENSORS, **QK_NORMS},
           "gemma2": GEMMA_TENSORS, "gemma3": GEMMA_TENSORS, "phi3": PHI3_TENSORS}


def _reader(path: str | os.PathLike):
    """The parsed file, cached: parsing a real vocabulary's metadata takes seconds, and resolve, config, weights and
    tokenizer each need it. Keyed by size and mtime, so a rewritten file is read again."""
    require("gguf", "gguf", "Reading a GGUF checkpoint")
    path = Path(path).resolve()
    try:
        stat = path.stat()
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise CheckpointError(f"Could not read the GGUF file {path}: {err}. Check the path.") from err
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file: it starts with {magic!r}, a GGUF file with b'GGUF'. Point "
                              "kiln at a .gguf file written by llama.cpp, or at a Hugging Face checkpoint directory.")
    return _open(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _open(path: str, mtime_ns: int, size: int):
    import gguf

    check_sizes(path, size)
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # gguf raises ValueError, IndexError, KeyError ... for any malformed or cut-off file
        raise CheckpointError(f"{path} is a GGUF file that cannot be parsed ({type(err).__name__}: {err}). It is "
                              "probably truncated or corrupt: download it again.") from err


# GGUF value type -> bytes, for the fixed-size types; 8 is a string (u64 length + bytes), 9 an array.
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def check_sizes(path: str | os.PathLike, size: int) -> None:
    """Check every count, length and tensor extent the header claims against the file size, before gguf's reader
    parses it: that reader walks an array element by element, reading past the end as empty, so a bit flip that
    claims 2**62 elements spins for ever and fills memory. Walks the header only (a real vocabulary: ~0.1 s)."""
    import mmap
    import struct

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    broken = f"{path} is a GGUF file that cannot be parsed:"
    if size < 24:
        raise CheckpointError(f"{broken} {size} bytes are too few for a GGUF header. It is probably truncated: "
                              "download it again.")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        pos = 4  # after the magic
        # As gguf's reader: a version with its low half zero was written on a machine of the other byte order.
        order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"

        def need(n: int, what: str) -> None:
            if n > size - pos:
                raise CheckpointError(f"{broken} it claims {what} ({n} bytes from byte {pos}) beyond the end of the "
                                      f"file ({size} bytes). It is probably truncated or corrupt: download it again.")

        def read(fmt: str, what: str) -> int:
            nonlocal pos
            need(struct.calcsize(fmt), what)
            (value,) = struct.unpack_from(order + fmt, data, pos)
            pos += struct.calcsize(fmt)
            return value

        def skip(kind: int, what: str, depth: int = 0) -> None:
            nonlocal pos
            if kind in _SCALAR_BYTES:
                need(_SCALAR_BYTES[kind], what)
                pos += _SCALAR_BYTES[kind]
            elif kind == _STRING:
                length = read("Q", f"the length of {what}")
                need(length, what)
                pos += length
            elif kind == _ARRAY and depth < 2:
                item, count = read("I", f"the item type of {what}"), read("Q", f"the length of {what}")
                least = _SCALAR_BYTES.get(item, 8 if item == _STRING else 12)  # bytes per item, at least
                need(count * least, f"{count} items of {what}")
                if item in _SCALAR_BYTES:
                    pos += count * least
                else:
                    for _ in range(count):
                        skip(item, what, depth + 1)
            else:
                raise CheckpointError(f"{broken} {what} has the unknown GGUF value type {kind}. It is corrupt or "
                                      "from a newer GGUF version: download it again, or upgrade the gguf package.")

        if read("I", "the version") not in (2, 3):
            return  # gguf's reader names the unsupported version
        tensors, entries = read("Q", "the tensor count"), read("Q", "the metadata count")
        alignment = 32
        for _ in range(entries):
            key_length = read("Q", "a metadata key length")
            need(key_length, "a metadata key")
            key = bytes(data[pos:pos + key_length])
            pos += key_length
            kind = read("I", "a metadata value type")
            if key == b"general.alignment" and kind == 4:
                alignment = read("I", "general.alignment")
            else:
                skip(kind, f"metadata value {key[:64]!r}")
        need(tensors * 24, f"{tensors} tensor descriptions")  # name length, dims, type, offset: 24 bytes at least
        extents = []
        for _ in range(tensors):
            skip(_STRING, "a tensor name")
            dims = read("I", "a tensor's dimension count")
            need(8 * dims, f"{dims} tensor dimensions")
            shape = struct.unpack_from(f"{order}{dims}Q", data, pos)
            pos += 8 * dims
            kind, offset = read("I", "a tensor type"), read("Q", "a tensor offset")
            extents.append((shape, kind, offset))
        if alignment <= 0 or alignment & (alignment - 1):
            return  # gguf's reader refuses the alignment
        start = -(-pos // alignment) * alignment
        for shape, kind, offset in extents:
            try:
                block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                continue  # gguf's reader names the unknown tensor type
            elements = math.prod(shape)
            end = start + offset + elements * type_bytes // block
            if end > size:
                raise CheckpointError(f"{broken} a tensor of shape {list(shape)} ends at byte {end}, beyond the end "
                                      f"of the file ({size} bytes). It is probably truncated or corrupt: download it "
                                      "again.")


def _get(reader, key: str, default=None):
    """A metadata value as Python (str, int, float, bool or a list of them). Parsed here rather than with
    ``ReaderField.contents()``, which older gguf releases lack."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        return default

    def one(part, kind):
        return part.tobytes().decode("utf-8") if kind == GGUFValueType.STRING else part.tolist()[0]

    try:
        if field.types[0] == GGUFValueType.ARRAY:
            return [one(field.parts[i], field.types[-1]) for i in field.data]
        return one(field.parts[-1], field.types[0])
    except UnicodeDecodeError:
        raise CheckpointError(f"GGUF metadata '{key}' holds text that is not valid UTF-8: the file is corrupt. "
                              "Download it again.") from None


# What each metadata value must be; a corrupt or unusual file otherwise fails later with a bare TypeError.
_KINDS = {
    "count": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 24, "a positive integer"),
    "id": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 31, "a token id"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a number"),
    "text": (lambda v: isinstance(v, str), "a string"),
    "texts": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of strings"),
    "ints": (lambda v: isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v),
             "a list of integers"),
    "numbers": (lambda v: isinstance(v, list) and all(isinstance(t, (int, float)) and not isinstance(t, bool)
                                                      and math.isfinite(t) for t in v), "a list of numbers"),
}


def _typed(reader, path: Path, key: str, kind: str, default=None):
    """A metadata value checked against ``kind`` (see _KINDS); ``default`` when the key is absent."""
    value = _get(reader, key)
    if value is None:
        return default
    ok, what = _KINDS[kind]
    if not ok(value):
        raise CheckpointError(f"{path.name}: GGUF metadata '{key}' must be {what}, found {value!r:.100}. The file is "
                              "corrupt or was written by an unusual converter; convert the checkpoint again with "
                              "llama.cpp's convert_hf_to_gguf.py.")
    return value


def read_config(path: str | os.PathLike) -> dict:
    """A Hugging Face style ``config.json`` dict (transformers' LlamaConfig keys) from the file's metadata."""
    reader, path = _reader(path), Path(path)
    arch = _get(reader, "general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise CheckpointError(f"{path.name} holds a GGUF model of architecture {arch!r:.100} (general.architecture); "
                              f"kiln reads GGUF files of architecture {', '.join(map(repr, ARCHITECTURES))} only. "
                              "Export the original Hugging Face checkpoint instead.")
    names = {t.name for t in reader.tensors}

    def need(key: str, kind: str = "count"):
        value = _get(reader, f"{arch}.{key}")
        if isinstance(value, list):  # per-layer values: kiln's references need them equal across layers
            if len(set(value)) != 1:
                raise CheckpointError(f"{path.name}: '{arch}.{key}' varies per layer ({value[:6]}...); kiln's {arch} "
                                      "reference needs one value for all layers.")
            value = value[0]
        if value is None:
            raise CheckpointError(f"{path.name} lacks the GGUF metadata key '{arch}.{key}'. The file is incomplete; "
                                  "convert the checkpoint again with llama.cpp's convert_hf_to_gguf.py.")
        ok, what = _KINDS[kind]
        if not ok(value):
            raise CheckpointError(f"{path.name}: GGUF metadata '{arch}.{key}' must be {what}, found {value!r:.100}. "
                                  "The file is corrupt: convert the checkpoint again.")
        return value

    hidden, heads = need("embedding_length"), need("attention.head_count")
    kv_heads = need("attention.head_count_kv") if f"{arch}.attention.head_count_kv" in reader.fields else heads
    if heads % kv_heads:
        raise CheckpointError(f"{path.name}: '{arch}.attention.head_count' ({heads}) is not a multiple of "
                              f"'{arch}.attention.head_count_kv' ({kv_heads}). The file is corrupt: convert the "
                              "checkpoint again.")
    q = next((t for t in reader.tensors if t.name == "blk.0.attn_q.weight"), None)
    q_rows = int(q.shape[-1]) if q is not None and len(q.shape) == 2 else 0  # ggml lists the output dimension last
    if arch == "phi3":  # q/k/v fused: the head width is the hidden size's share
        q_rows = hidden
    head_dim = (_typed(reader, path, f"{arch}.attention.key_length", "count")
                or (q_rows // heads if q_rows and q_rows % heads == 0 else hidden // heads))
    rotary = _typed(reader, path, f"{arch}.rope.dimension_count", "count", head_dim)
    if rotary != head_dim and (arch != "phi3" or rotary > head_dim or rotary % 2):
        raise CheckpointError(f"{path.name} rotates {rotary} of {head_dim} dimensions per head (partial RoPE); kiln's "
                              f"{arch} reference rotates all of them.")
    if "rope_freqs.weight" in names:
        raise CheckpointError(f"{path.name} carries per-frequency RoPE factors (tensor 'rope_freqs.weight', llama3 "
                              "scaling); kiln cannot read those from GGUF yet. Export the original checkpoint instead.")
    rope = {"rope_type": "default", "rope_theta": _f32(_typed(reader, path, f"{arch}.rope.freq_base", "number", 1e4))}
    scaling = _typed(reader, path, f"{arch}.rope.scaling.type", "text", "none")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=_f32(need("rope.scaling.factor", "number")))
    elif scaling != "none":
        raise CheckpointError(f"{path.name} uses RoPE scaling {scaling!r} ('{arch}.rope.scaling.type'); kiln reads "
                              "'linear' or none from GGUF.")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = (_typed(reader, path, f"{arch}.vocab_size", "count") or (len(tokens.data) if tokens is not None else None)
             or (int(embed.shape[-1]) if embed is not None else None))
    if arch == "phi3":
        rope["partial_rotary_factor"] = rotary / head_dim
        factors = {t.name: t for t in reader.tensors if t.name in ROPE_FACTORS}
        if factors:
            if len(factors) != 2:
                raise CheckpointError(f"{path.name} has one of LongRoPE's factor tensors {ROPE_FACTORS} without the "
                                      "other. The file is incomplete; convert the checkpoint again.")
            rope.update(rope_type="longrope", short_factor=_floats(factors[ROPE_FACTORS[0]]),
                        long_factor=_floats(factors[ROPE_FACTORS[1]]),
                        original_max_position_embeddings=need("rope.scaling.original_context_length"))
            attn_factor = _typed(reader, path, f"{arch}.rope.scaling.attn_factor", "number")
            if attn_factor is not None:
                rope["attention_factor"] = _f32(attn_factor)
    config = {
        "model_type": ARCHITECTURES[arch][0],
        "architectures": [ARCHITECTURES[arch][1]],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": _typed(reader, path, f"{arch}.context_length", "count", 2048),
        "rms_norm_eps": _f32(_typed(reader, path, f"{arch}.attention.layer_norm_rms_epsilon", "number", 1e-6)),
        "rope_theta": rope["rope_theta"],
        "rope_parameters": rope,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "tie_word_embeddings": "output.weight" not in names,  # llama.cpp drops a tied head: token_embd serves as both
        "torch_dtype": "float32",
    }
    if arch == "phi3":
        window = _typed(reader, path, f"{arch}.attention.sliding_window", "count")
        if window is not None:
            config["sliding_window"] = window
        if rope["rope_type"] == "longrope":
            config["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    if arch in GEMMA:
        del config["hidden_act"]
        config["hidden_activation"] = "gelu_pytorch_tanh"
        config["sliding_window"] = _typed(reader, path, f"{arch}.attention.sliding_window", "count")
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):  # Gemma 2 files carry both
            cap = _typed(reader, path, f"{arch}.{key}", "number")
            if cap is not None:
                config[key] = _f32(cap)
    for role in ("bos", "eos", "pad"):
        token_id = _typed(reader, path, f"tokenizer.ggml.{'padding' if role == 'pad' else role}_token_id", "id")
        if token_id is not None:
            config[f"{role}_token_id"] = token_id
    return config


def _floats(tensor) -> list[float]:
    """A small F32 tensor (LongRoPE's factors) as the list config.json holds."""
    import numpy as np

    return [float(str(v)) for v in np.asarray(tensor.data, dtype=np.float32).reshape(-1)]


def _f32(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    import numpy as np

    return float(str(np.float32(value)))


def _unpermute(w, n_head: int):
    """Undo llama.cpp's Q/K row order. Its converter (convert_hf_to_gguf.py, LlamaModel.permute) interleaves each
    head's two rotary halves into (re, im) pairs for ggml's RoPE: reshape(n_head, 2, D/2, ...).swapaxes(1, 2).
    HF's rotate_half, which kiln's reference follows, wants the halves: (n_head, D/2, 2, ...) -> (n_head, 2, D/2, ...)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str, arch: str = "llama") -> str:
    """llama.cpp tensor name -> HF name; an unknown name comes back unchanged (the builder reports it as unused)."""
    table = TENSORS[arch]
    stem, _, kind = name.rpartition(".")
    parts = stem.split(".")
    if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
        target = table.get(f"blk.{{i}}.{'.'.join(parts[2:])}")
        return f"{target.replace('{i}', parts[1])}.{kind}" if target else name
    return f"{table[stem]}.{kind}" if stem in table else name


def read_tensors(path: str | os.PathLike) -> dict:
    """Every tensor, dequantized to float32 numpy, under its Hugging Face name, Q/K rows in HF order."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    config = read_config(path)
    reader, path = _reader(path), Path(path)
    arch = _get(reader, "general.architecture")
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    state = {}
    for tensor in reader.tensors:
        if tensor.name in ROPE_FACTORS:
            continue  # read into the config (read_config)
        kind = GGMLQuantizationType(tensor.tensor_type)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists dimensions innermost first
        if not tensor.data.size or 0 in shape:
            raise CheckpointError(f"Tensor {tensor.name!r} in {path.name} is empty (shape {list(shape)}): the file is "
                                  "corrupt or truncated. Download or convert the checkpoint again.")
        try:
            data = dequantize(tensor.data, kind)
        except NotImplementedError as err:
            raise CheckpointError(f"Tensor {tensor.name!r} in {path.name} is stored as {kind.name}, which the "
                                  f"installed gguf package cannot dequantize ({err}). Upgrade it (pip install -U gguf) "
                                  "or convert the model with another quantization type.") from None
        data = np.ascontiguousarray(data, dtype=np.float32).reshape(shape)
        if not data.flags.writeable:  # F32 tensors view the read-only file mapping; torch wants memory of its own
            data = data.copy()
        role = tensor.name.split(".")[2] if tensor.name.startswith("blk.") and tensor.name.count(".") >= 3 else None
        if role in heads and arch in PERMUTED_QK:
            if data.ndim != 2 or data.shape[0] % (2 * heads[role]):
                raise CheckpointError(f"Tensor {tensor.name!r} in {path.name} has shape {list(data.shape)}: not "
                                      f"{heads[role]} heads of an even width, as the metadata says. The file is "
                                      "corrupt: convert the checkpoint again.")
            data = _unpermute(data, heads[role])
        if arch in GEMMA and tensor.name.endswith("norm.weight"):
            data = data - 1  # llama.cpp's converter added it (see GEMMA)
        state[hf_name(tensor.name, arch)] = data
    return state


def tensor_types(path: str | os.PathLike) -> dict[str, int]:
    """How many tensors the file stores in each type (F32, Q4_1, ...): what ``kiln inspect`` and reports show."""
    from collections import Counter

    from gguf import GGMLQuantizationType

    return dict(Counter(GGMLQuantizationType(t.tensor_type).name for t in _reader(path).tensors))


# What a conversion writes, versioned: a kiln that converts differently (Gemma's norms and tokenizer: 2) converts a
# file again instead of reusing what an older kiln left in the cache.
CONVERSION = 2


def convert(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """The Hugging Face style directory for GGUF ``path`` under ``root``, converted on first use (keyed by the file's
    sha256 and ``CONVERSION``, so a changed file, or a kiln that converts differently, converts again) and written
    atomically: config.json, model.safetensors (float32),
    tokenizer.json + tokenizer_config.json rebuilt from the vocabulary (or, for tokenizers kiln cannot rebuild, the
    tokenizer files found beside the GGUF file) and generation_config.json (the special token ids)."""
    import shutil
    import tempfile

    from filelock import FileLock

    from kiln.files import sha256_files
    from kiln.hub import PROCESSOR_FILES, TOKENIZER_FILES

    path = Path(path).resolve()
    config = read_config(path)  # a file that is not GGUF, is cut off, or holds another architecture fails here
    target = Path(root) / f"gguf{CONVERSION}-{sha256_files([path])[:24]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # two processes resolving the same file convert it once
        if (target / "config.json").is_file():
            return target
        log.info("Converting %s to a Hugging Face style checkpoint in %s", path.name, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            from safetensors.numpy import save_file

            save_file(read_tensors(path), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if not write_tokenizer(path, tmp):
                for name in (*TOKENIZER_FILES, *PROCESSOR_FILES):
                    if (path.parent / name).is_file():
                        shutil.copyfile(path.parent / name, tmp / name)
            generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
            if generation:
                (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")  # last: the mark
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


# The tokenizer half of the conversion, in its own module; re-exported here, where callers have found it.
from kiln.hub.gguf_tokenizer import build_tokenizer, tokenizer_config, write_tokenizer  # noqa: E402,F401
