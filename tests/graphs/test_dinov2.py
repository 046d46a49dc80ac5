"""DINOv2: the kiln reference vs transformers (position embeddings interpolated to the input's grid, layer scale, both
MLPs), save_pretrained round trips, config checks, and the export size taken from the image processor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import kiln
from kiln.errors import ConfigError, InputError
from kiln.graphs import registry
from kiln.graphs.dinov2.config import Dinov2Config, processed_size
from conftest import TINY_DINOV2, make_dinov2_checkpoint

TASKS = ["feature-extraction", "image-classification"]
OUTPUTS = {"image-classification": ["logits"], "feature-extraction": ["last_hidden_state", "pooler_output"]}
MLPS = {"mlp": {}, "swiglu": {"use_swiglu_ffn": True}}
# config image_size 40 (5x5 patches of 8): 32x32 interpolates the positions down, 56x56 up, 32x48 to a non-square grid,
# 40x40 uses them as learned, 44x44 drops a remainder (still 5x5).
SIZES = [(32, 32), (56, 56), (32, 48), (40, 40), (44, 44)]


@pytest.fixture(scope="module")
def dinov2_checkpoints(tmp_path_factory):
    cache = {}

    def get(task: str = "feature-extraction", mlp: str = "mlp"):
        if (task, mlp) not in cache:
            path = tmp_path_factory.mktemp(f"dinov2-{task}-{mlp}")
            cache[task, mlp] = make_dinov2_checkpoint(path, task, seed=len(cache), **MLPS[mlp])
        return cache[task, mlp]

    return get


def hf_model(task, path):
    """transformers returns attentions only from its eager implementation."""
    import transformers

    cls = transformers.Dinov2ForImageClassification if task == "image-classification" else transformers.Dinov2Model
    return cls.from_pretrained(str(path), attn_implementation="eager").eval()


def pixels(batch, height=32, width=32, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def assert_matches(ours, theirs, x, names, atol=1e-4):
    with torch.no_grad():
        a = ours(x, output_hidden_states=True, output_attentions=True)
        b = theirs(pixel_values=x, output_hidden_states=True, output_attentions=True)
    for name in names:
        torch.testing.assert_close(a[name], getattr(b, name), atol=atol, rtol=0, msg=name)
    assert len(a["hidden_states"]) == len(b.hidden_states) == 3 and len(a["attentions"]) == len(b.attentions) == 2
    for kind in ("hidden_states", "attentions"):
        for i, (p, q) in enumerate(zip(a[kind], getattr(b, kind))):
            torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=f"{kind}.{i}")


@pytest.mark.parametrize("mlp", list(MLPS))
@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("task", TASKS)
def test_reference_matches_transformers(task, attn_impl, mlp, dinov2_checkpoints):
    path, _ = dinov2_checkpoints(task, mlp)
    ours = kiln.from_pretrained(str(path), task=task, attn_impl=attn_impl)
    theirs = hf_model(task, path)
    for i, (height, width) in enumerate(SIZES):
        assert_matches(ours, theirs, pixels(2, height, width, seed=i), OUTPUTS[task])
    with torch.no_grad():
        assert set(ours(pixels(1))) == set(OUTPUTS[task]), "hidden states and attentions only on request"


def test_variant_config_matches_transformers(tmp_path):
    """No q/k/v bias, tanh-approximated GELU, another mlp_ratio (SwiGLU's width rounded to a multiple of 8), a
    patch of another shape, a grayscale input."""
    overrides = dict(qkv_bias=False, hidden_act="gelu_new", mlp_ratio=5, use_swiglu_ffn=True, patch_size=[8, 10],
                     image_size=[40, 50], num_channels=1)
    path, _ = make_dinov2_checkpoint(tmp_path, "feature-extraction", seed=5, **overrides)
    ours = kiln.from_pretrained(str(path))
    assert ours.config.swiglu_size == 112 and ours.config.position_grid == (5, 5)
    x = torch.randn(2, 1, 32, 30, generator=torch.Generator().manual_seed(0))
    assert_matches(ours, hf_model("feature-extraction", path), x, OUTPUTS["feature-extraction"])


def test_classification_checkpoint_as_feature_extractor(dinov2_checkpoints):
    path, _ = dinov2_checkpoints("image-classification")
    ours = kiln.from_pretrained(str(path), task="feature-extraction")
    theirs = hf_model("feature-extraction", path)
    with torch.no_grad():
        a, b = ours(pixels(2)), theirs(pixel_values=pixels(2))
    torch.testing.assert_close(a["last_hidden_state"], b.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(a["pooler_output"], b.pooler_output, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mlp", list(MLPS))
@pytest.mark.parametrize("task", TASKS)
def test_save_pretrained_round_trip(task, mlp, dinov2_checkpoints, tmp_path):
    path, _ = dinov2_checkpoints(task, mlp)
    ours = kiln.from_pretrained(str(path), task=task)
    ours.save_pretrained(tmp_path)
    original = {k for k in load_file(path / "model.safetensors") if not k.endswith("mask_token")}  # pretraining only
    assert set(load_file(tmp_path / "model.safetensors")) == original
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == [{"image-classification": "Dinov2ForImageClassification",
                                       "feature-extraction": "Dinov2Model"}[task]]
    assert_matches(ours, hf_model(task, tmp_path), pixels(2, seed=1), OUTPUTS[task])


def test_registered():
    arch = registry.model_types()["dinov2"]
    assert arch.family == "dinov2" and arch.spec == "vision-encoder" and set(arch.tasks) == set(TASKS)
    assert arch.hf_class("dinov2", "image-classification") == "Dinov2ForImageClassification"


def test_too_small_images_and_wrong_channels_are_refused(dinov2_checkpoints):
    model = kiln.from_pretrained(str(dinov2_checkpoints()[0]))
    with pytest.raises(InputError, match="at least 8x8"):
        model(pixels(1, 4, 32))
    with pytest.raises(InputError, match="3 channels"):
        model(torch.zeros(1, 1, 32, 32))


RAW = {"model_type": "dinov2", **TINY_DINOV2}


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 5}, "divisible"),
    ({"patch_size": 64}, "larger than 'image_size'"),
    ({"image_size": [40, 48]}, "square"),
    ({"mlp_ratio": 0}, "'mlp_ratio'"),
    ({"mlp_ratio": "4"}, "'mlp_ratio'"),
    ({"hidden_act": "mish"}, "'hidden_act'"),
    ({"use_swiglu_ffn": "yes"}, "'use_swiglu_ffn'"),
    ({"layer_norm_eps": 0}, "'layer_norm_eps'"),
])
def test_bad_configs_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        Dinov2Config.from_dict({**RAW, **change})


@pytest.mark.parametrize("processor, size", [
    ({"do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 256}}, (224, 224)),
    ({"do_center_crop": True, "crop_size": 32}, (32, 32)),
    ({"size": {"height": 48, "width": 40}}, (48, 40)),
    ({}, (224, 224)),  # kiln's runtime reads a missing size as 224, no crop (ViT's defaults)
    ({"size": {"shortest_edge": 256}}, None),  # each image keeps its aspect ratio: no one size
    ({"do_resize": False}, None),
])
def test_processed_size(processor, size):
    assert processed_size(processor) == size


def test_export_size_comes_from_the_image_processor(dinov2_checkpoints, caplog):
    model = kiln.from_pretrained(str(dinov2_checkpoints()[0]))
    assert model.config.input_size == (40, 40) and model.config.sequence_length == 26  # config.json's image_size
    raw = dict(model.config.raw)
    model.use_preprocessor_config(json.loads((dinov2_checkpoints()[0] / "preprocessor_config.json").read_text()))
    assert model.config.input_size == (32, 32) and model.config.sequence_length == 17
    assert model.embeddings.config is model.config and model.config.raw == raw  # config.json is written back as read
    model.use_preprocessor_config({"size": {"shortest_edge": 36}})
    assert model.config.input_size == (32, 32) and "no one size" in caplog.text
    with pytest.raises(ConfigError, match="smaller than 'patch_size'"):
        model.use_preprocessor_config({"size": 4})
