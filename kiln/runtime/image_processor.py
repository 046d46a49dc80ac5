"""Images -> ``pixel_values`` as transformers' ViT image processor (PIL backend) computes them, with Pillow and numpy.

Reads ``preprocessor_config.json``: ``do_resize``/``size`` ({"height", "width"}, {"shortest_edge"} or an int for a
square)/``resample`` (Pillow's filter number, 2 = bilinear), ``do_center_crop``/``crop_size``, ``do_rescale``/
``rescale_factor``, ``do_normalize``/``image_mean``/``image_std``, ``do_convert_rgb``. Missing keys take ViT's defaults.

Inputs, per image:
- a path (str or os.PathLike) or a PIL image: EXIF orientation applied, converted to RGB with Pillow (grayscale
  replicated, alpha dropped, palettes expanded), as ``transformers.pipeline`` does before its image processor;
- a numpy array (H, W), (H, W, Ch) or (Ch, H, W) with Ch in 1, 3, 4 (channels first when both ends could be channels,
  as transformers assumes), uint8, integers in [0, 255], or floats: whole numbers in [0, 255] or values in [0, 1].
  Arrays go to the processor as they are, as in transformers, so floats already in [0, 1] are still multiplied by
  ``rescale_factor`` (as if they held 0..255), exactly as transformers does; a warning says so. One or four channels: transformers raises unless
  ``do_convert_rgb``; kiln converts them as transformers' convert_to_rgb when ``do_convert_rgb`` (alpha composited
  onto white), else as Pillow's convert("RGB") would for the same pixels (alpha dropped), like a PIL input.

With torchvision installed, transformers 5 prefers its torchvision backend, which resizes with torchvision's own
interpolation and so differs slightly from Pillow; kiln follows the PIL backend (ViTImageProcessorPil), the one
transformers uses without torchvision.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.errors import ArtifactError, InputError, require
from kiln.files import read_json

log = logging.getLogger("kiln")
FILE = "preprocessor_config.json"
IMAGENET_STANDARD = [0.5, 0.5, 0.5]  # ViT's image_mean and image_std
MAX_SIZE = 8192  # pixels per side: far above any ViT input, far below a float image that exhausts memory
RESAMPLE_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class ImageBatch:
    pixel_values: np.ndarray  # (B, Ch, H, W) float32

    def feed(self, names) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in names}


def _pil():
    require("PIL", "vision", "Image pipelines")
    from PIL import Image, ImageOps

    return Image, ImageOps


def _size(value, name: str, allow_shortest: bool) -> dict:
    """transformers' size forms -> {"height", "width"} or {"shortest_edge"}; an int means a square (ViT's default)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value}
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"height": value[0], "width": value[1]}
    keys = {"height", "width"} if not isinstance(value, dict) or "shortest_edge" not in value else {"shortest_edge"}
    if (not isinstance(value, dict) or set(value) != keys or (keys == {"shortest_edge"} and not allow_shortest)
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIZE for v in value.values())):
        raise ArtifactError(f"{FILE} '{name}' must be {{\"height\": H, \"width\": W}}"
                            + (' or {"shortest_edge": S}' if allow_shortest else "") + f" with sizes up to {MAX_SIZE}, "
                            f"got {value!r:.200}. "
                            "kiln supports those forms only; fix the file or re-save the image processor.")
    return value


class ImageProcessor:
    """Callable on a list of images; returns an ``ImageBatch``. Immutable, so one instance serves many threads."""

    def __init__(self, config: dict):
        get = config.get
        self.do_resize = bool(get("do_resize", True))
        self.size = _size(get("size", 224), "size", allow_shortest=True) if self.do_resize else None
        self.resample = get("resample", 2)
        if type(self.resample) is not int or self.resample not in RESAMPLE_FILTERS:  # a list or dict is unhashable
            raise ArtifactError(f"{FILE} 'resample' must be a Pillow filter number {RESAMPLE_FILTERS}, "
                                f"got {self.resample!r}.")
        self.do_center_crop = bool(get("do_center_crop", False))
        self.crop_size = _size(get("crop_size"), "crop_size", allow_shortest=False) if self.do_center_crop else None
        self.do_rescale = bool(get("do_rescale", True))
        self.rescale_factor = get("rescale_factor", 1 / 255)
        self.do_normalize = bool(get("do_normalize", True))
        self.image_mean = get("image_mean", IMAGENET_STANDARD)
        self.image_std = get("image_std", IMAGENET_STANDARD)
        self.do_convert_rgb = bool(get("do_convert_rgb", False))
        if self.do_rescale and not _finite(self.rescale_factor):  # NaN would make every pixel NaN, silently
            raise ArtifactError(f"{FILE} 'rescale_factor' must be a finite number, got {self.rescale_factor!r}.")
        if self.do_normalize:
            self.image_mean, self.image_std = _stats(self.image_mean, "image_mean"), _stats(self.image_std, "image_std")

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "ImageProcessor":
        file = Path(path) / FILE
        return cls(read_json(file, "Re-export the artifact.", missing=(
            f"{file} is missing: image pipelines need the image processor settings. Save them into the checkpoint "
            "(AutoImageProcessor.from_pretrained(...).save_pretrained(dir)) and re-export.")))

    def __call__(self, images: list) -> ImageBatch:
        arrays, unit_floats = [], 0
        for image in images:
            array = self.load(image)
            unit_floats += array.dtype.kind == "f" and array.min() >= 0 and array.max() <= 1 and array.max() > 0
            arrays.append(self.process(array))
        if unit_floats and self.do_rescale:
            log.warning("%d image array(s) hold floats in [0, 1]: they are rescaled by %g as if they held 0..255, "
                        "exactly as transformers does. Pass uint8 or 0..255 values instead.", unit_floats,
                        self.rescale_factor)
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:  # only possible with shortest_edge resizing and no crop
            raise InputError(f"The images came out in different shapes {sorted(shapes)}; with {FILE} resizing to "
                             "'shortest_edge' and no center crop, pass images of one aspect ratio.")
        return ImageBatch(np.stack(arrays).astype(np.float32, copy=False))

    def load(self, image) -> np.ndarray:
        """One input -> a (Ch, H, W) array in its own dtype, RGB where transformers' pipeline makes it RGB."""
        if isinstance(image, np.ndarray):
            return self._from_array(image)
        if isinstance(image, (str, os.PathLike)):
            return self._from_pil(_open(image))
        pil = sys.modules.get("PIL.Image")  # a PIL image can exist only if PIL.Image was imported
        if pil is not None and isinstance(image, pil.Image):
            return self._from_pil(image)
        hint = " Convert tensors with .numpy()." if hasattr(image, "numpy") else ""
        raise InputError(f"An image must be a file path (str or pathlib.Path), a PIL image or a numpy array, got "
                         f"{type(image).__name__}.{hint}")

    def _from_pil(self, image) -> np.ndarray:
        _, ImageOps = _pil()
        try:
            rgb = ImageOps.exif_transpose(image).convert("RGB")
        except (OSError, ValueError) as err:  # a lazily opened image whose file turns out truncated or corrupt
            raise InputError(f"Cannot decode the PIL image ({err}).") from None
        return np.moveaxis(np.asarray(rgb), -1, 0)  # (H, W, 3) -> (3, H, W)

    def _from_array(self, array: np.ndarray) -> np.ndarray:
        if array.dtype.kind not in "uif":
            raise InputError(f"An image array must hold numbers (uint8, integers or floats), got dtype {array.dtype}.")
        if array.ndim == 2:
            array = array[None]  # (1, H, W)
        elif array.ndim == 3:
            if array.shape[0] not in (1, 3, 4):  # channels last, unless the first axis could be channels
                if array.shape[-1] not in (1, 3, 4):
                    raise InputError(f"Cannot tell the channel axis of an image array of shape {array.shape}: give "
                                     "(H, W), (H, W, Ch) or (Ch, H, W) with Ch = 1, 3 or 4.")
                array = np.moveaxis(array, -1, 0)
        else:
            raise InputError(f"An image array must have 2 or 3 dimensions, got shape {array.shape}. "
                             "Pass a batch as a list of images.")
        if array.size == 0:
            raise InputError(f"The image array is empty (shape {array.shape}).")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InputError("The image array holds NaN or infinite values.")
        if array.shape[0] == 1:
            array = np.repeat(array, 3, axis=0)  # gray -> RGB, as Pillow and transformers' convert_to_rgb do
        elif array.shape[0] == 4:
            array = _composite_on_white(array) if self.do_convert_rgb else array[:3]
        return array

    def process(self, image: np.ndarray) -> np.ndarray:
        """(Ch, H, W) -> resize, center crop, rescale, normalize, in transformers' order and arithmetic."""
        if self.do_resize:
            image = self._resize(image)
        if self.do_center_crop:
            image = _center_crop(image, self.crop_size["height"], self.crop_size["width"])
        if self.do_rescale:
            image = (image.astype(np.float64) * self.rescale_factor).astype(np.float32)  # upcast first, as transformers
        if self.do_normalize:
            image = image if image.dtype.kind == "f" else image.astype(np.float32)
            if len(self.image_mean) != image.shape[0]:
                raise ArtifactError(f"{FILE} 'image_mean' has {len(self.image_mean)} values for "
                                    f"{image.shape[0]} channels.")
            mean = np.asarray(self.image_mean, dtype=image.dtype)[:, None, None]
            std = np.asarray(self.image_std, dtype=image.dtype)[:, None, None]
            image = (image - mean) / std
        return image

    def _resize(self, image: np.ndarray) -> np.ndarray:
        """Through a uint8 PIL image, as transformers does: floats in [0, 1] go to 0..255 and back around it."""
        Image, _ = _pil()
        _, height, width = image.shape
        if "shortest_edge" in self.size:
            short, long = sorted((height, width))
            edge = self.size["shortest_edge"]
            new_short, new_long = edge, int(edge * long / short)
            target = (new_long, new_short) if width <= height else (new_short, new_long)
        else:
            target = (self.size["height"], self.size["width"])
        hwc = np.moveaxis(image, 0, -1)
        scaled = hwc.dtype != np.uint8 and _in_unit_range(hwc)
        if scaled:
            hwc = (hwc.astype(np.float64) * 255).astype(np.float32)
        resized = np.asarray(Image.fromarray(hwc.astype(np.uint8)).resize(target[::-1], resample=self.resample))
        out = np.moveaxis(resized, -1, 0)  # (3, H', W')
        return (out.astype(np.float64) * (1 / 255)).astype(np.float32) if scaled else out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _stats(values, name: str) -> list[float]:
    values = values if isinstance(values, list) else [values] * 3
    # Images reach normalization as RGB, so one value per channel (or one for all); NaN would pass silently.
    if len(values) not in (1, 3) or not all(_finite(v) for v in values):
        raise ArtifactError(f"{FILE} '{name}' must be a finite number or a list of 3 (one per RGB channel), got "
                            f"{values!r:.200}.")
    if name == "image_std" and any(v == 0 for v in values):
        raise ArtifactError(f"{FILE} 'image_std' must not contain 0, got {values!r}.")
    return [float(v) for v in values]


def _in_unit_range(image: np.ndarray) -> bool:
    """transformers' test before a PIL conversion: uint8-like values stay, floats in [0, 1] are scaled, else error."""
    if np.allclose(image, image.astype(int)):
        if image.min() < 0 or image.max() > 255:
            raise InputError(f"An image array holds whole numbers outside [0, 255] (from {image.min()} to "
                             f"{image.max()}); give pixel values in 0..255.")
        return False
    if image.min() < 0 or image.max() > 1:
        raise InputError(f"An image array holds floats from {image.min():g} to {image.max():g}: give whole numbers in "
                         "[0, 255] or floats in [0, 1].")
    return True


def _composite_on_white(image: np.ndarray) -> np.ndarray:
    """(4, H, W) RGBA -> (3, H, W) RGB over a white background, as transformers' convert_to_rgb for arrays."""
    if image.dtype.kind == "f" and (image.min() < 0 or image.max() > 1):
        raise InputError("An RGBA float image array must hold values in [0, 1] to composite its alpha.")
    white = 255 if image.dtype.kind in "ui" else 1.0
    alpha = image[3:4] / white
    rgb = alpha * image[:3] + (1 - alpha) * white
    return np.round(rgb).astype(image.dtype) if white == 255 else rgb.astype(image.dtype)


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(Ch, H, W) -> (Ch, height, width) around the centre, zero-padding an image smaller than the crop."""
    _, h, w = image.shape
    if height > h or width > w:
        H, W = max(height, h), max(width, w)
        top, left = math.ceil((H - h) / 2), math.ceil((W - w) / 2)
        padded = np.zeros((image.shape[0], H, W), dtype=image.dtype)
        padded[:, top:top + h, left:left + w] = image
        image, h, w = padded, H, W
    top, left = (h - height) // 2, (w - width) // 2
    return image[:, top:top + height, left:left + width]


def _open(path) -> "object":
    """A path -> a decoded PIL image, or an InputError naming the file."""
    Image, _ = _pil()
    text = os.fspath(path)
    if isinstance(text, str) and text.startswith(("http://", "https://")):
        raise InputError(f"{text!r} is a URL; kiln does not download images. Fetch it and pass the file or a "
                         "PIL image.")
    if not os.path.isfile(text):
        raise InputError(f"No image file at {text!r}.")
    try:
        image = Image.open(text)
        image.load()  # decode now, so a truncated file fails here with its name
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"Cannot read {text!r} as an image ({err}). Check that it is a PNG, JPEG or another format "
                         "Pillow reads.") from None
    return image
