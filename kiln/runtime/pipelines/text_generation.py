"""text-generation: prompts (or chats) -> generated text, as transformers.pipeline("text-generation") returns it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from kiln.errors import InputError
from kiln.runtime.generate import (DecoderSession, GenerationConfig, StreamDecoder, chat_template_from, generate,
                                   render_chat, steps)
from kiln.runtime.generate.beam import beam_search
from kiln.runtime.pipelines.base import Pipeline, given
from kiln.runtime.tokenizer import Batch

log = logging.getLogger("kiln")
# Keyword arguments that are generation options (everything else is a pipeline option).
GENERATION_OPTIONS = frozenset(GenerationConfig.__dataclass_fields__)


@dataclass
class Prompts:
    """What preprocess hands on: the encoded prompts, the items and rendered prompts (for return_full_text) and the
    generation options of this call."""

    batch: Batch
    items: list
    prompts: list[str]
    config: GenerationConfig


class TextGenerationPipeline(Pipeline):
    """``pipe("prompt")`` -> ``[{"generated_text": "prompt + continuation"}]``; a chat (list of {"role", "content"})
    is rendered with the artifact's chat template and comes back with the assistant's reply appended; a list of
    prompts gives a list of such lists. ``return_full_text=False`` returns only the new text. ``pipe.stream(prompt)``
    yields text pieces as they are generated. Generation options (``max_new_tokens``, ``do_sample``, ...) may be
    given at construction or call, like every option."""

    task = "text-generation"

    def setup(self) -> None:
        self.recompute_at = (self.manifest.get("decoder") or {}).get("recompute_cache_at")
        self.decoder = DecoderSession(self.engine, recompute_at=self.recompute_at)
        self.defaults = GenerationConfig.from_artifact(self.path)
        self.chat_template = chat_template_from(self.path)
        self.context = int(self.config.get("max_position_embeddings") or self.config.get("n_positions") or 0) or None
        if self.defaults.eos_token_id is None and self.config.get("eos_token_id") is not None:
            self.defaults = self.defaults.merge(eos_token_id=self.config["eos_token_id"])

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(sorted({*super().option_names(), *GENERATION_OPTIONS}))

    def _sanitize_parameters(self, return_full_text=None, add_special_tokens=None, truncation=None, **generation):
        self.defaults.merge(**generation)  # checks the values now, before any work
        # As transformers: plain prompts get the tokenizer's special tokens (e.g. BOS); rendered chats hold them.
        pre = {**given(add_special_tokens=add_special_tokens, truncation=truncation), **given(**generation)}
        return pre, {}, given(return_full_text=return_full_text)

    def _items(self, inputs):
        if _is_chat(inputs):
            return True, [inputs]
        if isinstance(inputs, list) and inputs and all(_is_chat(x) for x in inputs):
            return False, list(inputs)
        return super()._items(inputs)

    def preprocess(self, items, add_special_tokens=None, truncation: bool = False, **generation) -> Prompts:
        config = self.defaults.merge(**generation)
        prompts = [self._prompt(item) for item in items]
        special = add_special_tokens if add_special_tokens is not None else not _is_chat(items[0])
        return Prompts(self._encode(prompts, special, config, truncation), list(items), prompts, config)

    def forward(self, model_inputs: Prompts, batch_size: int, head_mask=None) -> np.ndarray:
        batch, config = model_inputs.batch, model_inputs.config
        session, n = self._session(head_mask), config.num_return_sequences
        if config.num_beams > 1:  # each prompt's n best beams
            rows = beam_search(session, batch.input_ids, batch.attention_mask, config, config.num_beams,
                               config.length_penalty, early_stopping=config.early_stopping, num_return_sequences=n)
        elif n == 1:
            return generate(session, batch.input_ids, batch.attention_mask, config, decode=self._decode_new)
        else:  # n samples per prompt: each prompt n times, as transformers expands the batch
            limit = session.max_batch
            if limit is not None and n > limit:
                raise InputError(f"num_return_sequences={n} samples {n} rows at once, but this artifact takes batches "
                                 f"of at most {limit}: ask for at most {limit}, or re-export with --batch 1:{n}.")
            step = limit // n if limit else len(batch.input_ids)
            rows = [row for i in range(0, len(batch.input_ids), step)
                    for row in generate(session, np.repeat(batch.input_ids[i:i + step], n, axis=0),
                                        np.repeat(batch.attention_mask[i:i + step], n, axis=0), config,
                                        decode=self._decode_new).tolist()]
        pad = (config.eos_ids or (config.pad_token_id or 0,))[0]  # padded after their end, as generate's rows are
        out = np.full((len(rows), max(map(len, rows), default=0)), pad, dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, :len(row)] = row
        return out

    def postprocess(self, model_inputs: Prompts, outputs: np.ndarray, return_full_text: bool = True) -> list:
        results, n = [], model_inputs.config.num_return_sequences
        for i, (item, prompt) in enumerate(zip(model_inputs.items, model_inputs.prompts)):
            texts = [self._decode_new(_strip_pad(tokens, model_inputs.config)) for tokens in outputs[i * n:(i + 1) * n]]
            results.append([{"generated_text": _full(item, prompt, text) if return_full_text else text}
                            for text in texts])
        return results

    def request(self, item, **kwargs) -> tuple[np.ndarray, GenerationConfig]:
        """One prompt (or chat) as a decode loop takes it: its token ids (special tokens added as a call adds them)
        and the generation options of this call (``kiln.runtime.generate.continuous`` serves requests so)."""
        pre, _, _, _ = self._params(kwargs)
        prompts = self.preprocess([item], **pre)
        return prompts.batch.input_ids[0][prompts.batch.attention_mask[0] == 1], prompts.config

    def completions(self, item, **kwargs) -> list[Completion]:
        """One prompt (or chat) -> a ``Completion`` per returned sequence: its new text and what a server reports
        with it (OpenAI's usage and finish_reason): the prompt's tokens, the tokens generated, and "stop" (an end
        token or a stop string) or "length" (``max_new_tokens`` reached)."""
        pre, forward, _, _ = self._params(kwargs)
        prompts = self.preprocess([item], **pre)
        config, prompt_tokens = prompts.config, int(prompts.batch.attention_mask.sum())
        results = []
        for row in self.forward(prompts, 1, **forward):
            tokens = _strip_pad(row, config)
            text = self._decode_new(tokens)
            stopped = len(tokens) < config.max_new_tokens or any(s in text for s in config.stop_strings)
            results.append(Completion(text, prompt_tokens, len(tokens), "stop" if stopped else "length"))
        return results

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
        """Yield text pieces of one prompt's continuation as tokens come (complete characters only). Takes the
        options of a call but return_full_text and batch_size: a stream is one prompt's new text."""
        return self._open_stream(prompt, None, kwargs)

    def stream_completion(self, prompt, counts: dict, **kwargs) -> Iterator[str]:
        """``stream`` that also fills ``counts`` as it goes: ``prompt_tokens``, ``completion_tokens`` and, once the
        stream ends, ``finish_reason`` ("stop" or "length"), for servers that report them after the last piece."""
        return self._open_stream(prompt, counts, kwargs)

    def _open_stream(self, prompt, counts: dict | None, kwargs: dict) -> Iterator[str]:
        for name in ("return_full_text", "batch_size"):
            if name in kwargs:
                raise InputError(f"stream() takes no {name}: it yields the new text of one prompt; print the prompt "
                                 "first for the full text.")
        pre, forward, _, _ = self._params(kwargs)
        prompts = self.preprocess([prompt], **pre)
        if prompts.config.num_beams > 1:
            raise InputError(f"stream() with num_beams={prompts.config.num_beams}: a beam search knows its text only "
                             "at the end; call the pipeline, or stream with num_beams=1.")
        if prompts.config.num_return_sequences > 1:
            raise InputError("stream() yields one sequence; call the pipeline for num_return_sequences > 1.")
        return self._stream(prompts, self._session(forward.get("head_mask")), counts)

    def _session(self, head_mask) -> DecoderSession:
        return self.decoder if head_mask is None else DecoderSession(self.engine, feed={"head_mask": head_mask},
                                                                     recompute_at=self.recompute_at)

    def _stream(self, prompts: Prompts, session: DecoderSession, counts: dict | None = None) -> Iterator[str]:
        # The decode loop is a generator advanced from here: each piece reaches the caller as its token is chosen,
        # and a caller that stops reading closes the loop, whose finally releases the engine's state.
        config, decoder, eos = prompts.config, StreamDecoder(self._decode_new), set(prompts.config.eos_ids)
        batch = prompts.batch
        counts = counts if counts is not None else {}
        counts.update(prompt_tokens=int(batch.attention_mask.sum()), completion_tokens=0)
        ended, text = False, []
        with contextlib.closing(steps(session, batch.input_ids, batch.attention_mask, config,
                                      decode=self._decode_new)) as loop:
            for tokens in loop:
                if int(tokens[0]) in eos:
                    ended = True
                    continue
                counts["completion_tokens"] += 1
                if piece := decoder.push(int(tokens[0])):
                    text.append(piece)
                    yield piece
        if tail := decoder.flush():
            text.append(tail)
            yield tail
        stopped = ended or counts["completion_tokens"] < config.max_new_tokens or \
            any(s in "".join(text) for s in config.stop_strings)
        counts["finish_reason"] = "stop" if stopped else "length"

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


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end token or stop string) or "length" (max_new_tokens)


def _is_chat(item) -> bool:
    return isinstance(item, list) and bool(item) and all(isinstance(m, dict) and "role" in m for m in item)


def _strip_pad(tokens: np.ndarray, config: GenerationConfig) -> list[int]:
    """New tokens up to (not including) the first EOS: what was generated before the row stopped."""
    eos, out = set(config.eos_ids), []
    for t in tokens.tolist():
        if t in eos:
            break
        out.append(t)
    return out


def _full(item, prompt: str, text: str):
    if _is_chat(item):
        return [*item, {"role": "assistant", "content": text}]
    return prompt + text
