"""Triton Python-backend model written by ``kiln triton``: texts in, token ids out, tokenized as kiln's runtime does.

Runs as ``<name>_preprocess/1/model.py`` with the artifact's ``tokenizer.json`` beside it. Needs numpy and
``tokenizers`` (``pip install tokenizers`` in the Triton container, or a Python-backend execution environment), not
kiln. Its settings are config.pbtxt's parameters, computed by kiln from the artifact: ``max_length`` (longer texts
are cut to it, as kiln's pipelines do with truncation on), ``pad_id``, ``padding_side`` and ``pad_to_multiple_of``
(padding to a multiple lets Triton's dynamic batcher put more requests in one batch: it batches only requests whose
shapes match).

Input ``TEXT``: UTF-8 strings, (B, 1). Outputs: the int64 arrays named in config.pbtxt (``input_ids``,
``attention_mask``, ``token_type_ids``), each (B, T).
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from tokenizers import Tokenizer

        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.max_length = int(parameters["max_length"])
        self.pad_id = int(parameters["pad_id"])
        self.left = parameters.get("padding_side", "right") == "left"
        self.multiple = max(1, int(parameters.get("pad_to_multiple_of", "1")))
        directory = os.path.join(args["model_repository"], args["model_version"])
        self.tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        self.tokenizer.no_padding()  # padded below, in numpy, as kiln does
        self.tokenizer.enable_truncation(self.max_length)
        self.outputs = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                texts = decode(pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy())
                arrays = self.encode(texts)
            except ValueError as err:  # a client's mistake: answered as an error, the model stays up
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err))))
                continue
            tensors = [pb_utils.Tensor(name, arrays[name].astype(dtype)) for name, dtype in self.outputs.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def encode(self, texts):
        """{input_ids, attention_mask, token_type_ids}: (B, T) int64 arrays, T the longest row rounded up to
        ``pad_to_multiple_of`` (at most ``max_length``)."""
        encodings = self.tokenizer.encode_batch(texts)
        longest = max(len(e.ids) for e in encodings)
        T = min(-(-longest // self.multiple) * self.multiple, max(self.max_length, longest))
        # Copied from kiln.runtime.tokenizer.Tokenizer._pad (without offsets and the special-tokens mask)
        B = len(encodings)
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, T), dtype=np.int64)
        types = np.zeros((B, T), dtype=np.int64)
        for b, e in enumerate(encodings):
            n = len(e.ids)
            where = slice(T - n, T) if self.left else slice(0, n)
            ids[b, where], mask[b, where], types[b, where] = e.ids, e.attention_mask, e.type_ids
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def finalize(self):
        self.tokenizer = None


def decode(values) -> list:
    """TEXT's bytes as str; a ValueError naming the item for what is not UTF-8, or for an empty batch."""
    texts = []
    for i, value in enumerate(np.asarray(values, dtype=object).reshape(-1)):
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"TEXT item {i} is not valid UTF-8 ({err.reason} at byte {err.start}); send UTF-8 "
                                 "text.") from None
        texts.append(str(value))
    if not texts:
        raise ValueError("TEXT is empty; send at least one string, shaped (B, 1).")
    return texts
