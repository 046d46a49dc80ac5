"""The image-classification pipeline and image processor vs transformers on the same weights and images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same  # noqa: F401  (also imported from here by other test modules)
from PIL import Image

import kiln
from kiln.errors import ArtifactError, InputError
from kiln.runtime.image_processor import ImageProcessor

ROOT = Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)
RGBA = RNG.integers(0, 256, (37, 29, 4), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (33, 47), dtype=np.uint8)



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    Image.fromarray(RGB).save(d / "rgb.png")
    Image.fromarray(GRAY).save(d / "gray.png")
    Image.fromarray(RGBA).save(d / "rgba.png")
    Image.fromarray(RGB).convert("P").save(d / "palette.png")
    Image.fromarray(RGB).save(d / "photo.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display; both pipelines must apply it
    Image.fromarray(RGB[:, :30]).save(d / "rotated.jpg", exif=exif)
    (d / "notes.png").write_text("not an image")
    (d / "truncated.png").write_bytes((d / "rgb.png").read_bytes()[:60])
    return d


@pytest.fixture(scope="module")
def theirs(vit_checkpoints):
    import transformers

    path, _ = vit_checkpoints("image-classification")
    # Pin the PIL backend: transformers picks it anyway without torchvision, which kiln follows (see image_processor).
    processor = transformers.ViTImageProcessorPil.from_pretrained(str(path))
    return transformers.pipeline("image-classification", model=str(path), image_processor=processor, device="cpu")


@pytest.fixture(scope="module")
def ours(vit_artifacts):
    return kiln.pipeline("image-classification", vit_artifacts("image-classification"), batch_size=3)


@pytest.mark.parametrize("name", ["rgb.png", "gray.png", "rgba.png", "palette.png", "photo.jpg", "rotated.jpg"])
def test_files_match_transformers(name, files, ours, theirs):
    assert_same(ours(str(files / name)), theirs(str(files / name)))
    assert_same(ours(files / name), theirs(str(files / name)))  # pathlib.Path too (transformers takes str only)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16"])
def test_pil_images_match_transformers(mode, ours, theirs):
    image = Image.fromarray(RGBA).convert(mode) if mode != "I;16" else Image.fromarray(GRAY.astype(np.uint16) * 200)
    assert_same(ours(image, top_k=4), theirs(image, top_k=4))


@pytest.mark.parametrize("array", [
    RGB, np.ascontiguousarray(RGB.transpose(2, 0, 1)), RGB.astype(np.int64), RGB.astype(np.float32),
    RGB.astype(np.float64) / 255, RGB[:3, :3],
], ids=["hwc-uint8", "chw-uint8", "int64", "float-0-255", "float-0-1", "tiny-3x3x3"])
def test_arrays_match_transformers(array, ours, theirs):
    assert_same(ours(array), theirs(array))


@pytest.mark.parametrize("array, as_pil", [
    (GRAY, Image.fromarray(GRAY)), (GRAY[..., None], Image.fromarray(GRAY)), (RGBA, Image.fromarray(RGBA)),
], ids=["gray-2d", "gray-hw1", "rgba"])
def test_gray_and_rgba_arrays_convert_like_the_same_pil_image(array, as_pil, ours, theirs):
    """transformers raises for these arrays; kiln converts them as Pillow would the same image."""
    assert_same(ours(array), theirs(as_pil))


def test_lists_batch_across_calls(files, ours, theirs):
    items = [str(files / "rgb.png"), Image.fromarray(RGBA), RGB, str(files / "gray.png"), RGB[::-1].copy(),
             Image.fromarray(GRAY), str(files / "photo.jpg")]  # 7 images, batch_size 3: three engine calls
    assert_same(ours(items, top_k=2), theirs([i for i in items], top_k=2))
    assert_same(ours(tuple(items[:2])), theirs(items[:2]))
    assert_same(ours([RGB]), theirs([RGB]))  # a one-item list stays a list of lists


@pytest.mark.parametrize("top_k", [1, 2, 4, 5, 100, None])
@pytest.mark.parametrize("function", [None, "sigmoid", "none", "SOFTMAX"])
def test_top_k_and_function_to_apply(top_k, function, ours, theirs):
    kwargs = {"top_k": top_k} if function is None else {"top_k": top_k, "function_to_apply": function}
    got = ours(RGB, **kwargs)
    assert_same(got, theirs(RGB, **kwargs))
    assert len(got) == min(5 if top_k is None else top_k, 4)  # None means the default 5, capped at the label count
    assert [d["score"] for d in got] == sorted((d["score"] for d in got), reverse=True)


def test_options_at_construction_and_generators_match_transformers(files, vit_checkpoints, vit_artifacts):
    import transformers

    path, _ = vit_checkpoints("image-classification")
    options = {"top_k": 2, "function_to_apply": "sigmoid"}
    processor = transformers.ViTImageProcessorPil.from_pretrained(str(path))
    theirs = transformers.pipeline("image-classification", model=str(path), image_processor=processor, device="cpu",
                                   **options)
    ours = kiln.pipeline("image-classification", vit_artifacts("image-classification"), batch_size=2, **options)
    images = [str(files / name) for name in ("rgb.png", "gray.png", "photo.jpg")]
    assert_same(ours(images[0]), theirs(images[0]))
    assert_same(ours(images, top_k=3), theirs(images, top_k=3))
    assert_same(list(ours(image for image in images)), list(theirs(image for image in images)))


PROCESSOR_CONFIGS = {
    "vit": {"size": {"height": 32, "width": 32}},
    "shortest-edge-bicubic-crop": {"size": {"shortest_edge": 40}, "resample": 3, "do_center_crop": True,
                                   "crop_size": {"height": 32, "width": 32}},
    "crop-pads-small-images": {"do_resize": False, "do_center_crop": True, "crop_size": {"height": 48, "width": 36}},
    "no-normalize": {"size": {"height": 24, "width": 20}, "do_normalize": False, "resample": 0},
    "imagenet-stats": {"size": {"height": 32, "width": 32}, "image_mean": [0.485, 0.456, 0.406],
                       "image_std": [0.229, 0.224, 0.225], "resample": 1},
    "no-rescale": {"size": {"height": 32, "width": 32}, "do_rescale": False},
}


@pytest.mark.parametrize("name", PROCESSOR_CONFIGS)
def test_image_processor_matches_transformers(name, tmp_path):
    import transformers

    config = PROCESSOR_CONFIGS[name]
    transformers.ViTImageProcessorPil(**config).save_pretrained(tmp_path)
    theirs = transformers.ViTImageProcessorPil.from_pretrained(tmp_path)
    ours = ImageProcessor.from_dir(tmp_path)
    for image in (RGB, RGB.astype(np.float32) / 255, np.ascontiguousarray(RGB[:31, :45].transpose(2, 0, 1))):
        got = ours([image]).pixel_values
        want = theirs(images=image, return_tensors="np")["pixel_values"]
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_rgba_array_with_do_convert_rgb_composites_on_white(tmp_path):
    import transformers

    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}, do_convert_rgb=True).save_pretrained(tmp_path)
    want = transformers.ViTImageProcessorPil.from_pretrained(tmp_path)(images=RGBA, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ImageProcessor.from_dir(tmp_path)([RGBA]).pixel_values, want, atol=1e-4)


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing.png"), "No image file at .*missing.png"),
    (lambda d: str(d / "notes.png"), "Cannot read .*notes.png"),
    (lambda d: d / "truncated.png", "Cannot read .*truncated.png"),
    (lambda d: "https://example.com/cat.png", "kiln does not download images"),
    (lambda d: np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    (lambda d: np.full((8, 8, 3), np.inf), "infinite"),
    (lambda d: RGB.astype(np.float32) + 0.5, "floats from 0.5 to 255.5"),
    (lambda d: RGB.astype(np.int64) - 10, "outside \\[0, 255\\]"),
    (lambda d: np.zeros((8, 8, 3), bool), "dtype bool"),
    (lambda d: np.zeros((2, 8, 8, 3), np.uint8), "2 or 3 dimensions"),
    (lambda d: np.zeros((8, 8, 5), np.uint8), "channel axis"),
    (lambda d: np.zeros((0, 8, 3), np.uint8), "empty"),
    (lambda d: Image.open(d / "truncated.png"), "Cannot decode the PIL image"),
    (lambda d: 42, "got int"),
    (lambda d: b"\x89PNG", "got bytes"),
    (lambda d: {"image": RGB}, "got dict"),
    (lambda d: None, "got NoneType"),
    (lambda d: [], "list is empty"),
], ids=["missing", "text-as-png", "truncated", "url", "nan", "inf", "float-range", "int-range", "bool", "4d",
        "channels", "empty-array", "lazy-truncated-pil", "int", "bytes", "dict", "none", "empty"])
def test_bad_inputs_say_what_is_wrong(make, message, files, ours):
    with pytest.raises(InputError, match=message):
        ours(make(files))
    with pytest.raises(InputError, match=message):
        ours([RGB, make(files)] if not isinstance(make(files), list) else make(files))


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 0}, "top_k"), ({"top_k": -1}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"top_k": True}, "top_k"),
    ({"function_to_apply": "bogus"}, "function_to_apply"),
])
def test_bad_options(kwargs, message, ours):
    with pytest.raises(InputError, match=message):
        ours(RGB, **kwargs)


def test_artifact_problems(vit_artifacts, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(vit_artifacts("image-classification"), art)
    config = json.loads((art / "preprocessor_config.json").read_text())
    (art / "preprocessor_config.json").write_text(json.dumps({**config, "size": {"height": 24, "width": 24}}))
    with pytest.raises(InputError, match=r"makes images of shape \(3, 24, 24\).*takes \(3, 32, 32\)"):
        kiln.pipeline("image-classification", art)(RGB)
    (art / "preprocessor_config.json").write_text(json.dumps({**config, "size": {"longest_edge": 24}}))
    with pytest.raises(ArtifactError, match="'size' must be"):
        kiln.pipeline("image-classification", art)
    (art / "preprocessor_config.json").unlink()
    with pytest.raises(ArtifactError, match="preprocessor_config.json is missing"):
        kiln.pipeline("image-classification", art)


def test_running_the_pipeline_loads_no_heavy_module(vit_artifacts):
    code = f"""
import json, sys
import numpy as np
import kiln
pipe = kiln.pipeline("image-classification", {str(vit_artifacts("image-classification"))!r})
pipe(np.zeros((40, 40, 3), np.uint8))
print(json.dumps(sorted(m for m in ("torch", "transformers", "kiln.graphs", "kiln.exporter") if m in sys.modules)))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
