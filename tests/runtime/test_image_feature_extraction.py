"""The image-feature-extraction pipeline vs transformers' on ViT and DINOv2 feature-extraction artifacts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import kiln
from kiln.errors import ArtifactError, InputError
from conftest import assert_same, make_dinov2_checkpoint

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)
TALL = RNG.integers(0, 256, (64, 36, 3), dtype=np.uint8)
RGBA = RNG.integers(0, 256, (37, 29, 4), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (33, 47), dtype=np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    for name, array in (("rgb", RGB), ("tall", TALL), ("rgba", RGBA), ("gray", GRAY)):
        Image.fromarray(array).save(d / f"{name}.png")
    return d


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    root = tmp_path_factory.mktemp("dinov2")
    path, _ = make_dinov2_checkpoint(root / "checkpoint", "feature-extraction", use_swiglu_ffn=True)
    kiln.export(str(path), root / "artifact", batch="1:8")
    return path, root / "artifact"


@pytest.fixture(scope="module", params=["vit", "dinov2"])
def pair(request, vit_checkpoints, vit_artifacts, dinov2):
    """(kiln pipeline, transformers pipeline) on the same weights."""
    import transformers

    if request.param == "vit":
        path, artifact = vit_checkpoints("feature-extraction")[0], vit_artifacts("feature-extraction")
    else:
        path, artifact = dinov2
    theirs = transformers.pipeline("image-feature-extraction", model=str(path), device="cpu")
    return kiln.pipeline("image-feature-extraction", artifact, batch_size=3), theirs


@pytest.mark.parametrize("name", ["rgb.png", "tall.png", "rgba.png", "gray.png"])
def test_files_match_transformers(name, files, pair):
    ours, theirs = pair
    want = theirs(str(files / name))
    assert_same(ours(str(files / name)), want)
    assert_same(ours(files / name), want)  # pathlib.Path too (transformers takes str only)
    assert np.asarray(want).shape[:1] == (1,)  # [1, tokens, hidden] per image


def test_lists_pil_and_arrays_match_transformers(files, pair):
    ours, theirs = pair
    images = [Image.open(files / "rgb.png"), Image.fromarray(TALL), Image.open(files / "gray.png"),
              Image.fromarray(RGBA)]
    assert_same(ours(images), theirs(images))  # 4 images in batches of 3
    # transformers' image-feature-extraction takes no arrays (its image-classification does): the same pixels as PIL
    assert_same(ours(RGB), theirs(Image.fromarray(RGB)))
    assert_same(ours([RGB, TALL], batch_size=1), theirs([Image.fromarray(RGB), Image.fromarray(TALL)]))


def test_pool_matches_transformers(files, pair):
    ours, theirs = pair
    images = [str(files / "rgb.png"), str(files / "tall.png")]
    got = ours(images, pool=True)
    assert_same(got, theirs(images, pool=True))
    assert np.asarray(got).shape[:2] == (2, 1)  # [1, hidden] per image
    made_with_pool = kiln.pipeline("image-feature-extraction", ours.path, pool=True)  # at construction too
    assert_same(made_with_pool(images), got)
    assert_same(made_with_pool(images, pool=False), theirs(images))  # the call's value wins


def test_return_tensors(files, pair):
    ours, theirs = pair
    got, want = ours(str(files / "rgb.png"), return_tensors=True), theirs(str(files / "rgb.png"), return_tensors=True)
    assert isinstance(got, np.ndarray) and got.shape == tuple(want.shape)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    pooled = ours([RGB, TALL], pool=True, return_tensors=True)
    assert [p.shape for p in pooled] == [(1, want.shape[-1])] * 2


def test_iterator_input(pair):
    ours, theirs = pair
    results = ours(iter([RGB, TALL, RGB]))
    assert_same(list(results), theirs([Image.fromarray(a) for a in (RGB, TALL, RGB)]))


def test_pool_without_a_pooler_names_the_fix(vit_checkpoints, tmp_path):
    """A classification checkpoint exported for its encoder has no pooler, as in transformers (which raises too)."""
    path, _ = vit_checkpoints("image-classification")
    kiln.export(str(path), tmp_path / "artifact", task="feature-extraction", batch="1:2")
    pipe = kiln.pipeline("image-feature-extraction", tmp_path / "artifact")
    assert np.asarray(pipe(RGB)).shape == (1, 17, 32)
    with pytest.raises(InputError, match="pool=True needs a pooled output.*Leave pool out"):
        pipe(RGB, pool=True)


def test_text_artifacts_are_refused(artifacts):
    with pytest.raises(ArtifactError, match="text feature-extraction artifact.*pipeline\\('feature-extraction'"):
        kiln.pipeline("image-feature-extraction", artifacts("bert", "feature-extraction"))


def test_other_tasks_and_options_are_refused(vit_artifacts, dinov2):
    with pytest.raises(ArtifactError, match="exported for 'image-classification'.*--task feature-extraction"):
        kiln.pipeline("image-feature-extraction", vit_artifacts("image-classification"))
    pipe = kiln.pipeline("image-feature-extraction", dinov2[1])
    with pytest.raises(InputError, match="Unknown image-feature-extraction option.*pool, return_tensors"):
        pipe(RGB, image_processor_kwargs={"size": 64})
    with pytest.raises(InputError, match="empty"):
        pipe([])
    with pytest.raises(InputError, match="is a URL"):
        pipe("https://example.com/cat.png")


def test_from_a_checkpoint_directory(dinov2):
    """kiln.pipeline on a checkpoint exports its feature-extraction artifact first (cached)."""
    import transformers

    path, _ = dinov2
    ours = kiln.pipeline("image-feature-extraction", str(path))
    assert ours.manifest["task"] == "feature-extraction"
    theirs = transformers.pipeline("image-feature-extraction", model=str(path), device="cpu")
    assert_same(ours(RGB, pool=True), theirs(Image.fromarray(RGB), pool=True))
