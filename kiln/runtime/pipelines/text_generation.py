"""text-generation: prompts (or chats) -> generated text, as transformers.pipeline("text-generation") returns it."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from kiln.errors import InputError
from kiln.runtime.decoding import DecoderSession, generate
from kiln.runtime.generation import GenerationConfig, StreamDecoder, chat_template_from, render_chat
from kiln.runtime.pipelines.base import Pipeline

log = logging.getLogger("kiln")
# Keyword arguments that are generation options (everything else is a pipeline option).
GENERATION_OPTIONS = set(GenerationConfig.__dataclass_fields__)


class TextGenerationPipeline(Pipeline):
    """``pipe("prompt")`` -> ``[{"generated_text": "prompt + continuation"}]``; a chat (list of {"role", "content"})
    is rendered with the artifact's chat template and comes back with the assistant's reply appended; a list of
    prompts gives a list of such lists. ``return_full_text=False`` returns only the new text. ``pipe.stream(prompt)``
    yields text pieces as they are generated."""

    task = "text-generation"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decoder = DecoderSession(self.engine)
        self.defaults = GenerationConfig.from_artifact(self.path)
        self.chat_template = chat_template_from(self.path)
        self.context = int(self.config.get("max_position_embeddings") or self.config.get("n_positions") or 0) or None
        if self.defaults.eos_token_id is None and self.config.get("eos_token_id") is not None:
            self.defaults = self.defaults.merge(eos_token_id=self.config["eos_token_id"])

    def _items(self, inputs):
        if _is_chat(inputs):
            return True, [inputs]
        if isinstance(inputs, list) and inputs and all(_is_chat(x) for x in inputs):
            return False, list(inputs)
        return super()._items(inputs)

    def __call__(self, inputs, **kwargs):
        single, items = self._items(inputs)
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in GENERATION_OPTIONS}
        config = self.defaults.merge(**options)
        return_full_text = kwargs.pop("return_full_text", True)
        # As transformers: plain prompts get the tokenizer's special tokens (e.g. BOS); rendered chats already hold them.
        add_special_tokens = kwargs.pop("add_special_tokens", None)
        truncation = kwargs.pop("truncation", False)
        if kwargs:
            raise InputError(f"Unknown text-generation option(s) {sorted(kwargs)}; generation options are "
                             f"{sorted(GENERATION_OPTIONS)}, plus return_full_text, add_special_tokens and truncation.")
        results = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            prompts = [self._prompt(item) for item in chunk]
            special = add_special_tokens if add_special_tokens is not None else not _is_chat(chunk[0])
            batch = self._encode(prompts, special, config, truncation)
            new = generate(self.decoder, batch.input_ids, batch.attention_mask, config, decode=self._decode_new)
            for item, prompt, tokens in zip(chunk, prompts, new):
                text = self._decode_new(_strip_pad(tokens, config))
                results.append([{"generated_text": _full(item, prompt, text) if return_full_text else text}])
        return results[0] if single else results

    def batch(self, items: list, **kwargs) -> list:
        """As ``Pipeline.batch``; chats and plain prompts go in separate calls, since only plain prompts get the
        tokenizer's special tokens added and one call adds them to all its prompts or to none."""
        chats = {i for i, item in enumerate(items) if _is_chat(item)}
        if not 0 < len(chats) < len(items):
            return super().batch(items, **kwargs)
        results: list = [None] * len(items)
        for rows in (sorted(chats), [i for i in range(len(items)) if i not in chats]):
            for i, result in zip(rows, super().batch([items[i] for i in rows], **kwargs)):
                results[i] = result
        return results

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        """Yield text pieces of one prompt's continuation as tokens come (complete characters only)."""
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in GENERATION_OPTIONS}
        if kwargs:
            raise InputError(f"Unknown stream option(s) {sorted(kwargs)}.")
        config = self.defaults.merge(**options)
        batch = self._encode([self._prompt(prompt)], not _is_chat(prompt), config)
        decoder, pieces = StreamDecoder(self._decode_new), []

        def on_tokens(tokens: np.ndarray) -> None:
            if int(tokens[0]) not in _eos(config):
                pieces.append(decoder.push(int(tokens[0])))

        # The decode loop runs step by step inside this generator, so pieces reach the caller as they are made.
        for piece in _drive(self.decoder, batch, config, self._decode_new, on_tokens, pieces):
            yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    def _prompt(self, item) -> str:
        if _is_chat(item):
            if not self.chat_template:
                raise InputError("This artifact has no chat template (tokenizer_config.json 'chat_template'); "
                                 "pass a plain string prompt instead of a list of messages.")
            special = self.tokenizer.special_tokens
            return render_chat(item, self.chat_template, add_generation_prompt=True,
                               bos_token=special.get("bos_token") or "", eos_token=special.get("eos_token") or "")
        if not isinstance(item, str):
            raise InputError(f"text-generation takes a string, a chat (list of messages) or a list of those; got "
                             f"{type(item).__name__}.")
        return item

    def _encode(self, prompts: list[str], add_special_tokens: bool, config: GenerationConfig, truncation: bool = False):
        if any(p == "" for p in prompts):
            raise InputError("An empty prompt gives the model nothing to continue; give some text.")
        batch = self.tokenizer(prompts, truncation=None, add_special_tokens=add_special_tokens, padding_side="left")
        T = batch.input_ids.shape[1]
        if self.context and T + config.max_new_tokens > self.context:
            keep = self.context - config.max_new_tokens
            if not truncation or keep < 1:
                raise InputError(f"The prompt ({T} tokens) plus max_new_tokens ({config.max_new_tokens}) exceeds the "
                                 f"model's context window of {self.context} tokens. Shorten the prompt, lower "
                                 "max_new_tokens, or pass truncation=True to keep the prompt's last tokens.")
            # Left-padded rows end together: keeping the last columns keeps each prompt's most recent tokens.
            log.warning("Truncated the prompt from %d to its last %d tokens to fit the context window.", T, keep)
            batch.input_ids, batch.attention_mask = batch.input_ids[:, -keep:], batch.attention_mask[:, -keep:]
        return batch

    def _decode_new(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class _Abandoned(Exception):
    """Raised inside the decode loop of a stream whose consumer went away."""


def _drive(session, batch, config, decode, on_tokens, pieces) -> Iterator[str]:
    """Run ``generate`` one token at a time in a worker thread and hand the text pieces over as they appear."""
    import queue
    import threading

    handoff: queue.Queue = queue.Queue()
    done, abandoned = object(), threading.Event()

    def emit(tokens):
        # A client that stops reading (a closed connection) must not leave the model generating for nobody.
        if abandoned.is_set():
            raise _Abandoned
        on_tokens(tokens)
        while pieces:
            handoff.put(pieces.pop(0))

    def work():
        try:
            generate(session, batch.input_ids, batch.attention_mask, config, decode=decode, on_tokens=emit)
            handoff.put(done)
        except _Abandoned:
            pass
        except BaseException as err:  # re-raised in the consumer's thread
            handoff.put(err)

    threading.Thread(target=work, name="kiln-stream", daemon=True).start()
    try:
        while (item := handoff.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            if item:
                yield item
    finally:  # also when the generator is closed or garbage-collected before the end
        abandoned.set()


def _is_chat(item) -> bool:
    return isinstance(item, list) and bool(item) and all(isinstance(m, dict) and "role" in m for m in item)


def _eos(config: GenerationConfig) -> set[int]:
    return set(config.eos_ids)


def _strip_pad(tokens: np.ndarray, config: GenerationConfig) -> list[int]:
    """New tokens up to (not including) the first EOS: what was generated before the row stopped."""
    out = []
    for t in tokens.tolist():
        if t in _eos(config):
            break
        out.append(t)
    return out


def _full(item, prompt: str, text: str):
    if _is_chat(item):
        return [*item, {"role": "assistant", "content": text}]
    return prompt + text
