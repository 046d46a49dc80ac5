"""What the image pipelines share: images in (paths, PIL images, arrays, lists of them) through the artifact's image
processor, checked against the image size the graph was exported at."""

from __future__ import annotations

from kiln.errors import InputError
from kiln.runtime.image_processor import FILE, ImageBatch, ImageProcessor


class ImageInputs:
    """Mixed into a Pipeline whose inputs are images: ``load_images(shape)`` in ``load_preprocessor``, then
    ``_items`` takes an image or a list of them and ``images(items)`` gives the pixel values."""

    def load_images(self, shape) -> None:
        """``shape``: the graph's pixel_values shape, (batch, Ch, H, W), fixed but for the batch."""
        self.image_processor = ImageProcessor.from_dir(self.path)
        self.image_shape = tuple(int(d) for d in shape[1:])

    def _items(self, inputs) -> tuple[bool, list]:
        if isinstance(inputs, (list, tuple)):
            if not inputs:
                raise InputError("The input list is empty; give at least one image.")
            return False, list(inputs)
        return True, [inputs]

    def images(self, items) -> ImageBatch:
        batch = self.image_processor(items)
        if batch.pixel_values.shape[1:] != self.image_shape:
            raise InputError(f"{FILE} makes images of shape {batch.pixel_values.shape[1:]} (Ch, H, W) but the model "
                             f"takes {self.image_shape}. Set 'size' (or 'crop_size') there to the model's image size "
                             "and re-export.")
        return batch


def pixel_shape(inputs) -> tuple:
    """The pixel_values shape among a graph's inputs (engine TensorInfos or kiln.json dicts), or None."""
    for info in inputs:
        name = info["name"] if isinstance(info, dict) else info.name
        if name == "pixel_values":
            return tuple(info["shape"] if isinstance(info, dict) else info.shape)
    return None
