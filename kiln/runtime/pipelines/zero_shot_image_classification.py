"""zero-shot-image-classification: an image + text artifact (CLIP, SigLIP) scores candidate labels, as transformers'
``pipeline("zero-shot-image-classification")`` does: each label becomes a prompt ("This is a photo of {}."), the
image and the prompts are embedded by their towers, and the scaled cosines give the scores (CLIP: a softmax over the
labels; SigLIP: a sigmoid per label). The prompts' embeddings are cached per label set, so a service that asks the
same labels runs only the vision tower."""

from __future__ import annotations

from kiln.errors import InputError
from kiln.runtime.dual_encoder import DualEncoder
from kiln.runtime.pipelines.base import Pipeline
from kiln.runtime.pipelines.images import ImageInputs, pixel_shape
from kiln.runtime.pipelines.zero_shot_classification import CandidateLabels, check_template, parse_labels

DEFAULT_TEMPLATE = "This is a photo of {}."


class ZeroShotImageClassificationPipeline(CandidateLabels, ImageInputs, Pipeline):
    """Inputs: an image (path, PIL image, numpy array) or a list of them, with ``candidate_labels`` (also the second
    positional argument). Returns per image ``[{"score", "label"}, ...]``, best first."""

    task = "zero-shot-image-classification"

    def load_preprocessor(self) -> None:
        super().load_preprocessor()  # the tokenizer, for the prompts
        self.load_images(pixel_shape(self.manifest["vision"]["inputs"]))

    def setup(self) -> None:
        self.towers = DualEncoder(self.path, self.manifest, self.engine, self.tokenizer,
                                  device=self._open["device"], threads=self._open["threads"])

    def _sanitize_parameters(self, candidate_labels=None, hypothesis_template=None):
        pre = {}
        if candidate_labels is not None:
            pre["candidate_labels"] = parse_labels(candidate_labels)
        if hypothesis_template is not None:
            pre["hypothesis_template"] = check_template(hypothesis_template, DEFAULT_TEMPLATE)
        return pre, {}, {}

    def preprocess(self, items, candidate_labels=None, hypothesis_template: str = DEFAULT_TEMPLATE):
        if candidate_labels is None:
            raise InputError("zero-shot-image-classification needs candidate_labels, e.g. "
                             "classifier(image, candidate_labels=['cat', 'dog']).")
        return self.images(items), candidate_labels, hypothesis_template

    def forward(self, model_inputs, batch_size: int, head_mask=None) -> dict:
        if head_mask is not None:
            raise InputError("zero-shot-image-classification takes no head_mask.")
        images, labels, template = model_inputs
        return {"scores": self.towers.scores(self.towers.image_embeddings(images.pixel_values, batch_size),
                                             self.towers.label_embeddings(labels, template, batch_size))}

    def postprocess(self, model_inputs, outputs) -> list:
        _, labels, _ = model_inputs
        return [sorted(({"score": float(s), "label": label} for s, label in zip(row, labels)),
                       key=lambda d: -d["score"]) for row in outputs["scores"]]
