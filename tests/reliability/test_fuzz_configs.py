"""Hostile and broken files, fuzzed with hypothesis (issue 8, item 3): JSON files: config.json, tokenizer files, kiln.json, preprocessor and generation configs.

Each case writes a damaged or adversarial file (truncated, bit-flipped, a length field claiming a huge size, a JSON
value of the wrong type or size, deep nesting, a path that escapes the artifact) and runs the loader in a forked
child under an address-space cap and a time limit (``isolation.py``): the case passes when the loader succeeds or
raises one of kiln's own errors (a KilnError subclass); another exception, a crash, a hang or an allocation beyond
the cap fails it. Cases are derandomized (the same on every run, so CI is repeatable) and counted per loader; the
counts are printed and recorded as junit properties. ``KILN_FUZZ_EXAMPLES=N`` multiplies the cases for a long run.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
from hypothesis import given

from kiln import hub
from kiln.errors import KilnError

from fuzzing import TALLY, JSON_FOUND, found, fuzz, json_file, scratch
from fuzzing import report  # noqa: F401  (a fixture the tests request by name)


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
              "sliding_window": 8, "max_window_layers": 0},
    "qwen3": {"model_type": "qwen3", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "rope_theta": 1e6, "use_sliding_window": True, "sliding_window": 8,
              "layer_types": ["sliding_attention", "sliding_attention"], "tie_word_embeddings": True},
    "gemma2": {"model_type": "gemma2", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
               "query_pre_attn_scalar": 16, "sliding_window": 8, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh", "rope_theta": 10000.0},
    "gemma3_text": {"model_type": "gemma3_text", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8,
                    "query_pre_attn_scalar": 8, "sliding_window": 4, "sliding_window_pattern": 3,
                    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
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

    raw = hub.read_config(directory)
    arch = registry.architecture(raw)
    for task in arch.tasks:
        registry.check_task(raw, task)
    config = arch.config.from_dict(raw)
    # What the exporter derives from the config next: sizes must be numbers by now.
    for name in ("num_hidden_layers", "hidden_size", "head_dim", "num_key_value_heads", "max_position_embeddings",
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
               "qwen2": [{"rope_parameters": ["x"]}, {"rope_parameters": 7}],
               "gemma2": [{"layer_types": ["sliding_attention"]}, {"attn_logit_softcapping": "50"},
                          {"rope_local_base_freq": []}],
               "gemma3_text": [{"rope_parameters": {"full_attention": 5}}, {"rope_parameters": {"sliding_attention": []}},
                               {"sliding_window_pattern": 0.5}, {"rope_local_base_freq": -1},
                               {"use_bidirectional_attention": "yes"}],
               "qwen3": [{"layer_types": [[], {}]}, {"layer_types": ["full_attention", "sliding_attention"]},
                         {"max_window_layers": []}]}.get(arch, [])
    found(case, JSON_FOUND, config=(base, changes))()
    report(f"config.json ({arch})")


# --------------------------------------------------------------------------------------- tokenizer.json & co
def _load_tokenizer(directory):
    from kiln.runtime.generate import chat_template_from
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
    from kiln.runtime.generate import GenerationConfig

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

