"""Reading and writing checkpoints: save_pretrained round trips, shards, .bin, the hub cache offline, and bad input."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import kiln
from kiln import hub
from kiln.errors import CheckpointError, ConfigError, KilnError
from kiln.graphs import registry
from kiln.graphs.bert.config import BertConfig
from kiln.graphs.bert.model_torch import BertModel
from kiln.graphs.checkpoint import from_pretrained

ATOL = 1e-5
MODELS = [(m, t) for m in ("bert", "roberta") for t in ("feature-extraction", "text-classification")]
HEAD = {"feature-extraction": "last_hidden_state", "text-classification": "logits"}


def batch(config):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config.vocab_size, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[mask == 0] = config.pad_token_id
    return {"input_ids": ids, "attention_mask": mask}


def hf_class(task):
    import transformers

    return transformers.AutoModel if task == "feature-extraction" else transformers.AutoModelForSequenceClassification


def assert_same_outputs(kiln_model, hf_model, task):
    inputs = batch(hf_model.config)
    with torch.no_grad():
        got, want = kiln_model(**inputs)[HEAD[task]], getattr(hf_model(**inputs), HEAD[task])
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= ATOL


def copy_checkpoint(checkpoints, tmp_path, model_type="bert", task="feature-extraction", name="ckpt"):
    path, hf = checkpoints(model_type, task)
    return shutil.copytree(path, tmp_path / name), hf


# --- writing ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type,task", MODELS)
def test_save_pretrained_round_trip(checkpoints, tmp_path, model_type, task):
    path, hf = checkpoints(model_type, task)
    model = from_pretrained(path, task=task)
    out = model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == [type(hf).__name__] and raw["model_type"] == model_type
    assert set(load_file(out / "model.safetensors")) == set(load_file(path / "model.safetensors"))
    reloaded = hf_class(task).from_pretrained(out).eval()
    assert type(reloaded) is type(hf)
    assert_same_outputs(model, reloaded, task)
    assert_same_outputs(from_pretrained(out, task=task), hf, task)


def test_save_pretrained_without_raw_config(tmp_path):
    """A model built from a BertConfig (no config.json behind it) still writes a config transformers reads."""
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=20, max_position_embeddings=32)
    torch.manual_seed(0)
    model = BertModel(config).eval()
    model.save_pretrained(tmp_path)
    assert_same_outputs(model, hf_class("feature-extraction").from_pretrained(tmp_path).eval(), "feature-extraction")


# --- reading ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_sharded_checkpoint(checkpoints, tmp_path, model_type):
    _, hf = checkpoints(model_type, "text-classification")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    model = from_pretrained(tmp_path, task="text-classification")
    assert len(model.checkpoint.weight_files) > 1
    assert all(re.fullmatch(r"model-\d+-of-\d+\.safetensors", p.name) for p in model.checkpoint.weight_files)
    assert_same_outputs(model, hf, "text-classification")


def test_pytorch_bin_checkpoint(checkpoints, tmp_path):
    path, hf = checkpoints("bert", "text-classification")
    shutil.copy(path / "config.json", tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model = from_pretrained(tmp_path, task="text-classification")
    assert model.checkpoint.weight_format == "pytorch"
    assert_same_outputs(model, hf, "text-classification")


class Payload:
    """Stands for arbitrary code a pickle could run."""


@pytest.mark.parametrize("content,match", [({"w": Payload()}, r"weights_only=True.*Payload"),
                                           ([torch.zeros(2)], "does not hold a state dict")], ids=["object", "list"])
def test_pytorch_bin_that_is_not_a_state_dict_is_refused(checkpoints, tmp_path, content, match):
    shutil.copy(checkpoints("bert", "feature-extraction")[0] / "config.json", tmp_path)
    torch.save(content, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=re.compile(match, re.S)):
        from_pretrained(tmp_path)


# --- hub ids through the Hugging Face cache, offline ----------------------------------------------------------------

MAIN, V2 = "a" * 40, "b" * 40


@pytest.fixture
def hf_cache(checkpoints, tmp_path, monkeypatch):
    """A cache with kiln-test/tiny: refs/main -> a BERT snapshot, refs/v2 -> a RoBERTa one."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--kiln-test--tiny"
    for commit, model_type in ((MAIN, "bert"), (V2, "roberta")):
        shutil.copytree(checkpoints(model_type, "feature-extraction")[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v2").write_text(V2)
    # huggingface_hub reads both variables at import, so the environment alone is not enough.
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return repo


@pytest.mark.parametrize("revision,commit,model_type", [(None, MAIN, "bert"), ("main", MAIN, "bert"),
                                                        ("v2", V2, "roberta"), (V2, V2, "roberta")])
def test_hub_id_from_cache(hf_cache, revision, commit, model_type):
    checkpoint = hub.resolve("kiln-test/tiny", revision=revision)
    assert checkpoint.path == (hf_cache / "snapshots" / commit).resolve()
    assert checkpoint.weight_files == (checkpoint.path / "model.safetensors",)
    model = kiln.from_pretrained("kiln-test/tiny", revision=revision)
    assert model.config.model_type == model_type and model.checkpoint.source == "kiln-test/tiny"


@pytest.mark.parametrize("repo_id,revision,match", [
    ("kiln-test/absent", None, r"'kiln-test/absent' \(revision main\) is not in the local Hugging Face cache.*HF_HUB_OFFLINE"),
    ("kiln-test/tiny", "v3", r"'kiln-test/tiny' \(revision v3\) is not in the local"),
    ("kiln-test/tiny", "c" * 40, "revision c{40}"),
    ("not a hub id!", None, "'not a hub id!' is neither a checkpoint directory nor a valid hub id"),
])
def test_hub_id_not_in_cache(hf_cache, repo_id, revision, match):
    with pytest.raises(CheckpointError, match=match):
        kiln.from_pretrained(repo_id, revision=revision)


# --- bad input: kiln's own exception, naming the problem ------------------------------------------------------------


def edit_config(**changes):
    def edit(d):
        raw = json.loads((d / "config.json").read_text())
        raw.update(changes)
        (d / "config.json").write_text(json.dumps(raw))
    return edit


def edit_weights(fn):
    def edit(d):
        state = load_file(d / "model.safetensors")
        fn(state)
        save_file(state, d / "model.safetensors")
    return edit


def truncate(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def shard_and_drop(d):
    from transformers import AutoModel

    AutoModel.from_pretrained(d).save_pretrained(d, max_shard_size="20KB")
    os.remove(d / "model.safetensors")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    os.remove(d / sorted(set(index["weight_map"].values()))[-1])


def write_index(text):
    def edit(d):
        os.remove(d / "model.safetensors")
        (d / "model.safetensors.index.json").write_text(text)
    return edit


BAD = {
    "no config.json": (lambda d: os.remove(d / "config.json"), ConfigError, "No config.json in"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{model_type: bert"), ConfigError, "config.json is not valid JSON"),
    "config a list": (lambda d: (d / "config.json").write_text("[1, 2]"), ConfigError, "must hold a JSON object, found list"),
    "hidden_size str": (edit_config(hidden_size="abc"), ConfigError, "'hidden_size' must be a positive integer, got 'abc'"),
    "zero heads": (edit_config(num_attention_heads=0), ConfigError, "'num_attention_heads' must be a positive integer, got 0"),
    "heads not dividing": (edit_config(num_attention_heads=5), ConfigError, r"'hidden_size' \(32\) must be divisible by 'num_attention_heads' \(5\)"),
    "layers 10**9": (edit_config(num_hidden_layers=10**9), ConfigError, "'num_hidden_layers' = 1000000000 is implausibly large"),
    "num_labels str": (edit_config(num_labels="abc", id2label=None), ConfigError, "'num_labels' must be a positive integer"),
    "unknown model_type": (edit_config(model_type="bloom"), ConfigError, "'bloom' is not supported.*Supported model types: bert, camembert, clip, deberta-v2, dinov2, distilbert, .*roberta"),
    "model_type a list": (edit_config(model_type=["bert"]), ConfigError, r"\['bert'\] is not supported.*distilbert, .*roberta"),
    "no model_type": (edit_config(model_type=None), ConfigError, "no 'model_type'.*distilbert, .*roberta"),
    "no weights": (lambda d: os.remove(d / "model.safetensors"), CheckpointError, "No weights in .*model.safetensors"),
    "garbage safetensors": (lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage" * 8), CheckpointError,
                            "model.safetensors is not a readable safetensors file"),
    "truncated safetensors": (truncate, CheckpointError, "model.safetensors is not a readable safetensors file.*truncated"),
    "wrong shape": (edit_weights(lambda s: s.update({"encoder.layer.1.output.dense.weight": torch.zeros(32, 36)})),
                    CheckpointError, r"encoder\.layer\.1\.output\.dense\.weight has shape \(32, 36\).*implies \(32, 37\)"),
    "missing weight": (edit_weights(lambda s: s.pop("encoder.layer.1.attention.output.LayerNorm.bias")),
                       CheckpointError, r"lacks 1 weight\(s\).*encoder\.layer\.1\.attention\.output\.LayerNorm\.bias"),
    "missing shard": (shard_and_drop, CheckpointError, r"lists shards that are missing: model-0000(\d)-of-0000\1\.safetensors"),
    "index not JSON": (write_index("{"), CheckpointError, "index.json is not a valid safetensors index"),
    "index shard not a name": (write_index('{"weight_map": {"a": 3}}'), CheckpointError, "is not a valid safetensors index"),
    "index escapes the directory": (write_index('{"weight_map": {"a": "../x.safetensors"}}'), CheckpointError,
                                    "shard file names in the same directory"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint(checkpoints, tmp_path, case):
    mutate, error, match = BAD[case]
    directory, _ = copy_checkpoint(checkpoints, tmp_path)
    mutate(directory)
    with pytest.raises(error, match=re.compile(match, re.S)) as info:
        from_pretrained(directory)
    assert isinstance(info.value, KilnError)


def test_task_head_missing_from_base_checkpoint(checkpoints):
    path, _ = checkpoints("bert", "feature-extraction")
    with pytest.raises(CheckpointError, match=r"lacks 2 weight\(s\).*classifier\.weight, classifier\.bias"):
        from_pretrained(path, task="text-classification")


@pytest.mark.parametrize("config", [{"model_type": "bert"}, {"model_type": "roberta"}])
def test_unsupported_task(checkpoints, config):
    registry.check_task(config, "text-classification")
    with pytest.raises(ConfigError, match="'text-generation' is not supported.*feature-extraction, text-classification"):
        registry.check_task(config, "text-generation")
    with pytest.raises(ConfigError, match="'image-classification' is not supported"):
        from_pretrained(checkpoints("bert", "feature-extraction")[0], task="image-classification")


def test_paths_that_are_not_checkpoints(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match=r"No checkpoint directory at '.*/does-not-exist'"):
        from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(CheckpointError, match="config.json is a file; give the checkpoint directory"):
        from_pretrained(checkpoints("bert", "feature-extraction")[0] / "config.json")


def test_numpy_reading_widens_bf16_and_fp16_to_float32(tmp_path):
    """JAX/TF references read checkpoints as NumPy: bf16 tensors (which safetensors.numpy cannot read) are widened
    to float32 exactly, other dtypes come through as stored; .bin files are converted too."""
    from kiln.graphs.checkpoint import read_state_dict

    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(3, 5, generator=g).to(torch.bfloat16), "b": torch.randn(4, generator=g).half(),
             "c": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    save_file(state, tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    for name in ("model.safetensors", "pytorch_model.bin"):
        got = read_state_dict([tmp_path / name], framework="jax")
        assert got["a"].dtype.name == "float32" and (got["a"] == state["a"].float().numpy()).all()
        assert (got["b"].astype("float32") == state["b"].float().numpy()).all()
        assert (got["c"] == state["c"].numpy()).all() and got["c"].dtype.name == "int64"
