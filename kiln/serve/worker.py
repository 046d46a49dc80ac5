"""One artifact served: its pipeline and what each endpoint asks of it. Plain synchronous Python, so the same class
runs in-process (``LocalBackend``, threads) and as a Ray Serve replica (``kiln.serve.ray_app``).

Encoder calls (embeddings, every pipeline call of an encoder task) go through kiln's ``Batcher``, which gathers the
inputs of concurrent requests into one engine call (``max_batch_size``, ``batch_wait_ms``). Generation requests
share decode steps (``kiln.runtime.generate.continuous``): one joins the running batch at the next step and leaves
when it stops; what that loop does not take (beam search, several sequences, prompt lookup, LongRoPE, windowed
caches) runs one request at a time.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.batcher import Batcher
from kiln.runtime.pipelines import pipeline
from kiln.serve.openai import APIError, cut_at_stop

log = logging.getLogger("kiln")
EMBEDDING_TASKS = ("feature-extraction",)
GENERATION_TASKS = ("text-generation",)
MEDIA_TASKS = ("image-classification", "zero-shot-image-classification", "image-feature-extraction",
               "automatic-speech-recognition")


def api_error(err: KilnError) -> APIError:
    """kiln's own input errors are the client's to fix: a 400 saying what (never a traceback)."""
    return APIError(400, str(err))


class ModelWorker:
    def __init__(self, artifact: str, name: str | None = None, *, threads: int | None = None, device: str = "cpu",
                 max_batch_size: int = 8, batch_wait_ms: float = 5.0, pooling: str = "mean",
                 max_input_tokens: int | None = None):
        self.path = Path(artifact)
        self.name = name or self.path.name
        self.pipe = pipeline(None, self.path, threads=threads, device=device, batch_size=max_batch_size)
        self.task = self.pipe.task
        self.created = int(time.time())
        self.pooling = pooling
        self.max_input_tokens = max_input_tokens
        self.batcher = self.continuous = None
        if self.task not in GENERATION_TASKS and max_batch_size > 1:
            self.batcher = Batcher(self.pipe, max_batch_size=max_batch_size, max_wait_ms=batch_wait_ms)
        if self.task in GENERATION_TASKS and max_batch_size > 1:
            from kiln.runtime.generate import DecoderSession
            from kiln.runtime.generate.continuous import ContinuousBatcher, supports

            session = DecoderSession(self.pipe.engine, recompute_at=self.pipe.recompute_at)
            why = supports(session)
            if why is None:  # requests share decode steps, joining and leaving the running batch
                self.continuous = ContinuousBatcher(session, max_batch=max_batch_size, decode=self.pipe._decode_new)
            else:
                log.info("%s: generation runs one request at a time (%s).", self.name, why)

    def info(self) -> dict:
        return {"task": self.task, "created": self.created, "artifact": str(self.path)}

    def _check_tokens(self, texts: list[str]) -> int:
        """The inputs' token count (OpenAI's usage), refused above ``max_input_tokens``."""
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is None:
            return 0
        counts = [int(m.sum()) for m in tokenizer(texts, truncation=None).attention_mask]
        if self.max_input_tokens and max(counts) > self.max_input_tokens:
            raise APIError(400, f"An input has {max(counts)} tokens; this server takes at most "
                                f"{self.max_input_tokens} per input (--max-input-tokens).", param="input")
        return sum(counts)

    def _batched(self, items: list, **options) -> list:
        """Each item through the Batcher (gathered with other requests' items), or one call without it."""
        try:
            if self.batcher is None:
                return self.pipe.batch(items, **options)
            futures: list[Future] = [self.batcher.submit(item, **options) for item in items]
            return [f.result() for f in futures]
        except KilnError as err:
            raise api_error(err) from None

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """(N, D) unit vectors and the input tokens: mean-pooled token vectors of a text encoder (as
        sentence-transformers models pool), or an image + text artifact's projected text embeddings."""
        if self.task not in EMBEDDING_TASKS:
            raise APIError(400, f"Model {self.name!r} is a {self.task} model; embeddings need a feature-extraction "
                                "artifact.", param="model")
        tokens = self._check_tokens(texts)
        dual = getattr(self.pipe, "towers", None) is not None
        options = {} if dual else {"pooling": self.pooling, "normalize": True}
        vectors = self._batched(texts, return_tensors=True, **options)
        return np.stack(vectors).astype(np.float32), tokens

    def complete(self, prompt, options: dict) -> tuple[list[tuple[str, str]], int, int]:
        """(choices as (text, finish_reason), prompt tokens, completion tokens) of one prompt or chat."""
        self._check_generation()
        stops = options.get("stop_strings")
        if self._continuous(options):
            counts = {}
            text = "".join(self._pieces(prompt, options, counts))
            text, cut = cut_at_stop(text, stops)
            return [(text, "stop" if cut else counts["finish_reason"])], counts["prompt_tokens"], \
                counts["completion_tokens"]
        try:
            results = self.pipe.completions(prompt, **options)
        except KilnError as err:
            raise api_error(err) from None
        choices = []
        for r in results:
            text, cut = cut_at_stop(r.text, stops)
            choices.append((text, "stop" if cut else r.finish_reason))
        return choices, results[0].prompt_tokens, sum(r.completion_tokens for r in results)

    def stream(self, prompt, options: dict) -> Iterator[dict]:
        """{"text": piece} per piece, then {"finish_reason", "usage"}; text after a stop sequence is held back."""
        self._check_generation()
        stops, counts = options.get("stop_strings") or (), {}
        try:
            pieces = self._pieces(prompt, options, counts) if self._continuous(options) else \
                self.pipe.stream_completion(prompt, counts, **options)
        except KilnError as err:
            raise api_error(err) from None
        sent, buffer, reason = 0, "", None
        # A stop sequence may arrive across pieces: hold back as many characters as the longest one could still need.
        hold = max((len(s) for s in stops), default=1) - 1
        for piece in pieces:
            buffer += piece
            text, cut = cut_at_stop(buffer, stops)
            if cut:
                if len(text) > sent:
                    yield {"text": text[sent:]}
                reason = "stop"
                pieces.close()
                break
            ready = len(buffer) - hold
            if ready > sent:
                yield {"text": buffer[sent:ready]}
                sent = ready
        else:
            if len(buffer) > sent:
                yield {"text": buffer[sent:]}
        usage = {"prompt_tokens": counts.get("prompt_tokens", 0),
                 "completion_tokens": counts.get("completion_tokens", 0)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        yield {"finish_reason": reason or counts.get("finish_reason", "stop"), "usage": usage}

    def _media(self, item):
        if not (isinstance(item, dict) and set(item) == {"base64"} and isinstance(item["base64"], str)):
            raise APIError(400, f"{self.task} takes images or audio as {{\"base64\": \"...\"}} objects (the file's "
                                "bytes, base64-encoded); file paths are not read over HTTP.", param="inputs")
        try:
            data = base64.b64decode(item["base64"], validate=True)
        except (ValueError, binascii.Error):
            raise APIError(400, "An input's 'base64' is not valid base64.", param="inputs") from None
        if self.task == "automatic-speech-recognition":
            return data  # the pipeline decodes a file's bytes itself
        from kiln.errors import require

        image = require("PIL.Image", "vision", "Images over HTTP")
        try:
            return image.open(io.BytesIO(data))
        except Exception:  # noqa: BLE001 - Pillow's many decode errors: one answer
            raise APIError(400, "An input's bytes are not an image Pillow can read.", param="inputs") from None

    def rerank(self, query: str, texts: list[str], raw_scores: bool) -> list[dict]:
        """text-embeddings-inference's /rerank over a cross-encoder (a text-classification artifact with one
        output): one score per text, the sigmoid of its logit unless ``raw_scores``, best first."""
        if self.task != "text-classification" or len(self.pipe.id2label) != 1:
            raise APIError(400, f"Model {self.name!r} is not a reranker: /rerank needs a text-classification "
                                "artifact with one output (a cross-encoder).", param="model")
        pairs = [{"text": query, "text_pair": t} for t in texts]
        logits = np.array([r[0]["score"] for r in self._batched(pairs, top_k=None, function_to_apply="none")])
        scores = logits if raw_scores else 1.0 / (1.0 + np.exp(-logits))
        order = np.argsort(-scores, kind="stable")
        return [{"index": int(i), "score": float(scores[i])} for i in order]

    def predict(self, inputs, raw_scores: bool) -> list:
        """text-embeddings-inference's /predict: every label with its score, best first, per input (a text or a
        [text, pair])."""
        if self.task != "text-classification":
            raise APIError(400, f"Model {self.name!r} is a {self.task} model; /predict needs a text-classification "
                                "artifact.", param="model")
        items = [{"text": x[0], "text_pair": x[1]} if isinstance(x, list) else x for x in inputs]
        options = {"top_k": None, **({"function_to_apply": "none"} if raw_scores else {})}
        return self._batched(items, **options)

    def _continuous(self, options: dict) -> bool:
        return self.continuous is not None and options.get("num_return_sequences", 1) == 1 and \
            options.get("num_beams", 1) == 1 and not options.get("prompt_lookup_num_tokens")

    def _pieces(self, prompt, options: dict, counts: dict) -> Iterator[str]:
        """Text pieces of one request decoded in the shared loop; ``counts`` gets the token counts and why it
        stopped, as ``TextGenerationPipeline.stream_completion`` fills them."""
        from kiln.runtime.generate import StreamDecoder

        try:
            ids, config = self.pipe.request(prompt, **options)
            generation = self.continuous.submit(ids, config)
        except KilnError as err:
            raise api_error(err) from None
        counts.update(prompt_tokens=len(ids), completion_tokens=0)
        decoder = StreamDecoder(self.pipe._decode_new)
        with generation:  # leaving early (a client gone) takes the row out of the batch
            for token in generation:
                counts["completion_tokens"] += 1
                if piece := decoder.push(token):
                    yield piece
        if tail := decoder.flush():
            yield tail
        counts["finish_reason"] = "length" if generation.finish_reason == "length" else "stop"

    def _check_generation(self) -> None:
        if self.task not in GENERATION_TASKS:
            raise APIError(400, f"Model {self.name!r} is a {self.task} model; completions need a text-generation "
                                "artifact.", param="model")

    def run_pipeline(self, inputs, options: dict):
        """The pipeline's own output for ``inputs`` with ``options``: what ``kiln run`` prints. Images and audio come
        as {"base64": ...} objects (a string would be a path on the server: refused)."""
        if self.task in MEDIA_TASKS:
            inputs = [self._media(x) for x in inputs] if isinstance(inputs, list) else self._media(inputs)
        try:
            if self.batcher is not None and not isinstance(inputs, list):  # one input: gathered with others
                return self._batched([inputs], **options)[0]
            return self.pipe(inputs, **options)  # a list is one call already, shaped as the pipeline shapes lists
        except KilnError as err:
            raise api_error(err) from None

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        if self.continuous is not None:
            self.continuous.close()
