"""image-feature-extraction: an image encoder's features as transformers.pipeline("image-feature-extraction") returns
them, from a feature-extraction artifact of a vision model (ViT, DINOv2), or the vision tower's embeddings of an
image + text artifact (CLIP, SigLIP)."""

from __future__ import annotations

from kiln.errors import ArtifactError, InputError
from kiln.runtime.dual_encoder import DualEncoder, is_dual_encoder
from kiln.runtime.pipelines.base import Pipeline, given
from kiln.runtime.pipelines.images import ImageInputs, pixel_shape
from kiln.runtime.scores import normalize_rows


class ImageFeatureExtractionPipeline(ImageInputs, Pipeline):
    """Inputs: a file path (str or pathlib.Path), a PIL image, a numpy array, or a list of those (see
    ``kiln.runtime.image_processor``). Returns per image its ``last_hidden_state`` as a ``[1, tokens, hidden]`` nested
    list, as transformers; ``pool=True`` gives the model's ``pooler_output`` (``[1, hidden]``) instead, and
    ``return_tensors=True`` numpy arrays of those shapes. transformers' ``image_processor_kwargs`` and ``timeout`` are
    not taken: the image processor is the artifact's, and kiln reads no URLs.

    On an image + text artifact (CLIP, SigLIP) each image's projected embedding comes back, unit length (what it
    scores labels with; ``normalize=False``: transformers' ``get_image_features``), from the vision graph alone."""

    task = "image-feature-extraction"

    def load_preprocessor(self) -> None:
        self.towers = None
        if is_dual_encoder(self.manifest):  # the main graph is the text tower: images go to the vision graph
            self.towers = DualEncoder(self.path, self.manifest, self.engine, None, **self._open)
            self.load_images(pixel_shape(self.manifest["vision"]["inputs"]))
            self.output_names = ["image_embeds"]
            return
        shape = pixel_shape(self.engine.inputs())
        if shape is None:
            raise ArtifactError(f"{self.path} is a text {self.manifest['task']} artifact (its graph takes "
                                f"{', '.join(self.input_names)}, no pixel_values); image-feature-extraction runs image "
                                f"encoders (ViT, DINOv2, CLIP, SigLIP). Use pipeline('feature-extraction', ...) for "
                                "its text embeddings.")
        self.load_images(shape)
        self.output_names = [o.name for o in self.engine.outputs()]

    def _sanitize_parameters(self, pool=None, return_tensors=None, normalize=None):
        if self.towers is not None and pool is not None:
            raise InputError("pool does not apply to an image + text artifact: its image embeddings are pooled "
                             "already.")
        if normalize is not None and self.towers is None:
            raise InputError("normalize applies to image + text artifacts (CLIP, SigLIP); pool gives an image "
                             "encoder's pooled output.")
        if pool and "pooler_output" not in self.output_names:
            raise InputError(f"pool=True needs a pooled output, but {self.path} has none (its outputs: "
                             f"{', '.join(self.output_names)}): the checkpoint has no pooler. Leave pool out and take "
                             "the CLS token (features[0][0]), or export a checkpoint that has one (e.g. a ViTModel "
                             "saved with its pooling layer).")
        return {}, {}, given(pool=pool, return_tensors=return_tensors, normalize=normalize)

    def preprocess(self, items):
        return self.images(items)

    def forward(self, model_inputs, batch_size: int, head_mask=None) -> dict:
        if self.towers is None:
            return super().forward(model_inputs, batch_size, head_mask)
        if head_mask is not None:
            raise InputError("An image + text artifact takes no head_mask.")
        return {"image_embeds": self.towers.image_embeddings(model_inputs.pixel_values, batch_size, normalized=False)}

    def postprocess(self, model_inputs, outputs, pool: bool = False, return_tensors: bool = False,
                    normalize: bool = True):
        if "image_embeds" in outputs:
            embeds = normalize_rows(outputs["image_embeds"]) if normalize else outputs["image_embeds"]
            return [r if return_tensors else r.tolist() for r in embeds]
        features = outputs["pooler_output" if pool else "last_hidden_state"]  # (B, C) or (B, T, C)
        rows = [features[b : b + 1] for b in range(len(features))]  # each (1, ...), as transformers gives per image
        return [r if return_tensors else r.tolist() for r in rows]
