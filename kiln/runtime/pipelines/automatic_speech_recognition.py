"""automatic-speech-recognition: audio -> text, as ``transformers.pipeline("automatic-speech-recognition")`` returns it
for Whisper: ``{"text": ...}``, with ``return_timestamps=True`` the segments as ``chunks`` of
``{"timestamp": (start, end), "text": ...}``, with ``return_timestamps="word"`` every word as one (timed by dynamic
time warping over the alignment heads' cross-attention, see ``kiln.runtime.generate.whisper.token_timestamps``).

Inputs as transformers takes them: a path or URL-less file name, the file's bytes, a 1-D float array at the model's
rate (16 kHz), or ``{"raw" | "array": array, "sampling_rate": N}`` (resampled); a list of them gives a list of results.
Files are decoded with soundfile and resampled with soxr (``pip install 'kiln[audio]'``). The artifact's encoder runs
once per 30 s window, its cross-attention keys/values stay on the engine's side for the decoder's steps.
Options: ``return_timestamps``, ``generate_kwargs`` ({"language", "task", "prompt_ids", "max_new_tokens", sampling
options}) and ``max_new_tokens`` as transformers takes them.

Audio longer than 30 s is transcribed sequentially, window after window, each starting where the decoder's last
closed segment ended (openai's algorithm, which transformers' pipeline runs for such audio when no
``chunk_length_s`` is given): the features of the whole clip are computed at once, the language is detected on the
first window, and the windows are decoded with timestamps whether or not they are returned. With ``chunk_length_s``
(and ``stride_length_s``, default a sixth of it on each side) the audio is cut into overlapping chunks instead, decoded
``batch_size`` at a time and merged where they overlap, as transformers' pipeline does.

Decoding searches 5 beams by default, as transformers' pipeline does (openai's default) unless the artifact's
``generation_config.json`` sets ``num_beams``; ``num_beams=1`` decodes greedily, ``do_sample=True`` samples (with
one beam).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from kiln.errors import ArtifactError, InputError
from kiln.runtime.audio import WhisperFeatureExtractor, load_audio
from kiln.runtime.engines import open_engine
from kiln.runtime.generate import GenerationConfig
from kiln.runtime.generate.whisper import (LANGUAGES, TASKS, WhisperDecoding, WhisperSession, decode_asr,
                                           split_segments, token_timestamps)
from kiln.runtime.pipelines.base import Pipeline, given
from kiln.runtime.tokenizer import Tokenizer

# generate_kwargs that are Whisper's (the rest are generation options: max_new_tokens, do_sample, temperature, ...)
WHISPER_OPTIONS = ("language", "task", "prompt_ids")
SAMPLING_OPTIONS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed", "repetition_penalty",
                    "no_repeat_ngram_size")
SEARCH_OPTIONS = ("num_beams", "length_penalty", "early_stopping")


@dataclass
class Audio:
    """What preprocess hands on: the log-mel features of the clips that fit one window, batched, and of each longer
    clip whole (transcribed window after window)."""

    count: int
    short: list[int]  # which inputs fit one window
    input_features: np.ndarray | None  # (len(short), mel bins, window frames)
    long: list[tuple[int, np.ndarray]]  # (input, (mel bins, frames)) for the longer ones
    # with chunk_length_s, every input: (input, (chunks, mel bins, window frames), each chunk's stride in seconds and
    # its mel frames that hold audio)
    chunked: list[tuple[int, np.ndarray, list, list]] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)  # each input's mel frames that hold audio (word timestamps)


class AutomaticSpeechRecognitionPipeline(Pipeline):
    task = "automatic-speech-recognition"

    def load_preprocessor(self) -> None:
        self.tokenizer = Tokenizer.from_dir(self.path)
        self.feature_extractor = WhisperFeatureExtractor.from_dir(self.path)

    def setup(self) -> None:
        record = self.manifest.get("encoder")
        if not isinstance(record, dict) or "model" not in record:
            raise ArtifactError(f"{self.path} has no encoder graph in kiln.json; re-export it with "
                                "`kiln export MODEL OUT --task automatic-speech-recognition`.")
        path = self.path / "generation_config.json"
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: Whisper's decoding rules (special tokens, suppression, "
                                "timestamps) come from it. Re-export from a checkpoint that has it.")
        generation = json.loads(path.read_text())
        self.rules = WhisperDecoding.from_dict(generation)
        encoder = open_engine(self.path / record["model"], manifest={**self.manifest, **record}, **self._open)
        self.session = WhisperSession(encoder, self.engine, self.rules)
        self.positions = int(self.config.get("max_target_positions") or 448)
        # num_beams / length_penalty are this pipeline's own options (its default: 5 beams, below)
        self.defaults = GenerationConfig.from_artifact(self.path).merge(eos_token_id=self.rules.eos_token_id,
                                                                        num_beams=1, length_penalty=1.0)
        # transformers' pipeline searches 5 beams (openai's default) unless the generation config sets another count
        configured = generation.get("num_beams")
        self.num_beams = configured if isinstance(configured, int) and configured > 1 else 5
        # Seconds per timestamp token: the window over the encoder's positions (30 s / 1500 = 0.02 s).
        self.positions_source = int(self.config.get("max_source_positions", 1500))
        self.time_precision = self.feature_extractor.chunk_length / self.positions_source

    def _sanitize_parameters(self, return_timestamps=None, generate_kwargs=None, language=None, task=None,
                             prompt_ids=None, max_new_tokens=None, do_sample=None, temperature=None, top_k=None,
                             top_p=None, seed=None, repetition_penalty=None, no_repeat_ngram_size=None,
                             num_beams=None, length_penalty=None, early_stopping=None, chunk_length_s=None,
                             stride_length_s=None):
        """As transformers: generation options either in ``generate_kwargs`` or as keywords of their own."""
        if not any(return_timestamps is value for value in (None, True, False)) and return_timestamps != "word":
            raise InputError(f"return_timestamps={return_timestamps!r}: Whisper gives segment timestamps (True), word "
                             "timestamps ('word') or none (False).")
        if not isinstance(generate_kwargs or {}, dict):
            raise InputError(f"generate_kwargs must be a dict, got {type(generate_kwargs).__name__}.")
        generation = dict(generate_kwargs or {})
        unknown = sorted(set(generation) - set(WHISPER_OPTIONS) - set(SAMPLING_OPTIONS) - set(SEARCH_OPTIONS))
        if unknown:
            raise InputError(f"Unknown generate_kwargs {unknown}; kiln's Whisper takes "
                             f"{', '.join(WHISPER_OPTIONS + SAMPLING_OPTIONS + SEARCH_OPTIONS)}.")
        keywords = given(language=language, task=task, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
                         do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                         repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                         num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping)
        twice = sorted(set(keywords) & set(generation))
        if twice:
            raise InputError(f"{', '.join(twice)} given twice, as an option and in generate_kwargs; give it once.")
        generation.update(keywords)
        search = {k: generation.pop(k) for k in SEARCH_OPTIONS if k in generation}
        beams = search.get("num_beams", 1 if generation.get("do_sample") else self.num_beams)
        whisper = {k: generation.pop(k) for k in WHISPER_OPTIONS if k in generation}
        if whisper.get("task") is not None and whisper["task"] not in TASKS:
            raise InputError(f"task must be 'transcribe' or 'translate', got {whisper['task']!r}.")
        if whisper.get("language") is not None:
            self.rules.language_id(whisper["language"])  # an unknown language fails now, before any work
        if whisper.get("prompt_ids") is not None:
            ids = np.asarray(whisper["prompt_ids"])
            if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
                raise InputError("prompt_ids must be a non-empty 1-D list of token ids (the tokenizer's ids of the "
                                 "prompt text, after <|startofprev|>).")
            whisper["prompt_ids"] = ids.tolist()
        # checks the values now, the search options with the rest
        self.defaults.merge(**generation, num_beams=beams, length_penalty=search.get("length_penalty"),
                            early_stopping=search.get("early_stopping"))
        forward = {**given(return_timestamps=return_timestamps), **given(**whisper), **given(**generation),
                   **given(**search)}
        return self._chunking(chunk_length_s, stride_length_s), forward, {}

    def _chunking(self, chunk_length_s, stride_length_s) -> dict:
        """chunk_length_s / stride_length_s, checked, in samples (as transformers' pipeline rounds them)."""
        if chunk_length_s is None:
            if stride_length_s is not None:
                raise InputError("stride_length_s goes with chunk_length_s: give both, or neither.")
            return {}
        limit = self.feature_extractor.chunk_length
        if isinstance(chunk_length_s, bool) or not isinstance(chunk_length_s, (int, float)) \
                or not 0 < chunk_length_s <= limit:
            raise InputError(f"chunk_length_s must be a number of seconds in (0, {limit}] (Whisper hears {limit} s "
                             f"at a time), got {chunk_length_s!r}.")
        stride = chunk_length_s / 6 if stride_length_s is None else stride_length_s
        stride = [stride, stride] if isinstance(stride, (int, float)) and not isinstance(stride, bool) else stride
        if not isinstance(stride, (list, tuple)) or len(stride) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in stride):
            raise InputError(f"stride_length_s must be seconds >= 0, or [left, right], got {stride_length_s!r}.")
        rate = self.feature_extractor.sampling_rate
        length, left, right = (int(round(v * rate)) for v in (chunk_length_s, *stride))
        if length <= left + right:
            raise InputError(f"chunk_length_s={chunk_length_s} must be longer than the strides on both sides "
                             f"({stride[0]} + {stride[1]} s).")
        return {"chunk": (length, left, right)}

    def _items(self, inputs) -> tuple[bool, list]:
        if isinstance(inputs, (list, tuple)):
            if not inputs:
                raise InputError("Got an empty list of audio inputs; pass a file, bytes, an array or a list of them.")
            return False, list(inputs)
        return True, [inputs]

    def preprocess(self, items: list, chunk: tuple | None = None) -> Audio:
        extractor = self.feature_extractor
        clips = [load_audio(item, sampling_rate=extractor.sampling_rate) for item in items]
        frames = [self._frames(len(clip)) for clip in clips]
        if chunk is not None:
            return Audio(len(clips), [], None, [], [(i, *self._chunks(clip, *chunk)) for i, clip in enumerate(clips)],
                         frames)
        short = [i for i, clip in enumerate(clips) if extractor._frames(len(clip)) <= extractor.nb_max_frames]
        features = extractor([clips[i] for i in short])["input_features"] if short else None
        long = [(i, extractor([clip], padding="longest", truncation=False)["input_features"][0])
                for i, clip in enumerate(clips) if i not in short]
        return Audio(len(clips), short, features, long, frames=frames)

    def _frames(self, samples: int) -> int:
        """The mel frames that hold ``samples`` of audio, as transformers' attention mask counts them."""
        return -(-samples // self.feature_extractor.hop_length)

    def _chunks(self, clip: np.ndarray, length: int, left: int, right: int) -> tuple[np.ndarray, list, list]:
        """One clip cut as transformers' pipeline cuts it (``chunk_iter``): chunks of ``length`` samples overlapping
        by ``left`` + ``right``, no overlap before the first or after the last; each chunk's features, its stride
        (seconds of the chunk, of its left and right overlap) and its mel frames that hold audio."""
        rate, pieces, strides = self.feature_extractor.sampling_rate, [], []
        for start in range(0, len(clip), length - left - right):
            piece = clip[start:start + length]
            last = start + length >= len(clip)
            overlap_left, overlap_right = (0 if start == 0 else left), (0 if last else right)
            if len(piece) > overlap_left:
                pieces.append(piece)
                strides.append((len(piece) / rate, overlap_left / rate, overlap_right / rate))
            if last:
                break
        return self.feature_extractor(pieces)["input_features"], strides, [self._frames(len(p)) for p in pieces]

    def forward(self, model_inputs: Audio, batch_size: int, return_timestamps: bool = False, language=None,
                task=None, prompt_ids=None, **generation) -> dict:
        rows, word = [None] * model_inputs.count, return_timestamps == "word"
        if return_timestamps:  # transformers' generate moves on from the last closed segment within 30 s too
            model_inputs = Audio(model_inputs.count, [], None, [
                *model_inputs.long, *zip(model_inputs.short, list(model_inputs.input_features)
                                         if model_inputs.short else [])],
                model_inputs.chunked, model_inputs.frames)
        if model_inputs.short:  # without timestamps: one decode per clip, the clips together
            features = model_inputs.input_features
            cross = self.session.encode(features, handles=self._beams(generation) == 1)
            prompts = self._prompts(cross, features.shape[0], language, task, False, prompt_ids)
            for i, row in zip(model_inputs.short, self._decode(cross, prompts, generation, False)):
                rows[i] = [(row, None)]
        for i, features in model_inputs.long:
            tokens, times = self._tokens(features, language, task, prompt_ids, generation, model_inputs.frames[i],
                                         word)
            rows[i] = [(tokens, None, times)]
        for i, features, strides, frames in model_inputs.chunked:  # merged where they overlap by postprocess
            if return_timestamps:  # each chunk window after window, as transformers' generate with timestamps
                rows[i] = []
                for piece, stride, count in zip(features, strides, frames):
                    tokens, times = self._tokens(piece, language, task, prompt_ids, generation, count, word)
                    rows[i].append((tokens, stride, times))
                continue
            tokens = []  # batch_size chunks at a time
            for start in range(0, len(features), batch_size):
                part = features[start:start + batch_size]
                cross = self.session.encode(part, handles=self._beams(generation) == 1)
                prompts = self._prompts(cross, len(part), language, task, False, prompt_ids)
                tokens += self._decode(cross, prompts, generation, False)
            rows[i] = list(zip(tokens, strides))
        return {"rows": rows, "timestamps": return_timestamps or False, "language": language}

    def _tokens(self, features: np.ndarray, language, task, prompt_ids, generation: dict, frames: int | None = None,
                word: bool = False) -> tuple[list[int], list[float] | None]:
        """One clip's generated ids, window after window, and with ``word`` each one's time in seconds."""
        segments = list(self.segments(features, language, task, prompt_ids, generation, frames, word))
        tokens = [t for segment in segments for t in segment["tokens"]]
        return tokens, ([t for segment in segments for t in segment["times"]] if word else None)

    def segments(self, features: np.ndarray, language=None, task=None, prompt_ids=None, generation=None,
                 frames: int | None = None, word: bool = False):
        """Yield one clip's segments ``{"start", "end", "tokens"}`` (seconds, generated ids) as the windows are
        decoded: (mel bins, frames) features of the whole clip, any length. With ``word`` each segment also has its
        tokens' ``times`` (seconds from the clip's start), from its first ``frames`` mel frames (those with audio)."""
        for found in self._windows(features, language, task, prompt_ids, generation or {}, frames, word):
            yield from found

    def _windows(self, features: np.ndarray, language, task, prompt_ids, generation: dict, frames: int | None = None,
                 word: bool = False):
        """Each 30 s window's kept segments, window after window (see kiln.runtime.generate.whisper)."""
        window = self.feature_extractor.nb_max_frames
        stride = max(window // self.positions_source, 1)  # mel frames per encoder position (2)
        total, seek, prompts = features.shape[-1], 0, None
        frames = total if frames is None else frames
        while seek < total:
            size = min(total - seek, window)
            chunk = np.zeros((1, features.shape[0], window), dtype=np.float32)  # zeros after the end, as transformers
            chunk[0, :, :size] = features[:, seek:seek + size]
            cross = self.session.encode(chunk, handles=self._beams(generation) == 1)
            if prompts is None:  # the language is detected on the first window and kept, as transformers does
                prompts = self._prompts(cross, 1, language, task, True, prompt_ids)
            tokens = self._decode(cross, prompts, generation, True)[0]
            offset = seek * self.time_precision / stride
            found, advance = split_segments(tokens, self.rules.timestamp_begin, size, time_offset=offset,
                                            time_precision=self.time_precision, input_stride=stride)
            if word:  # each token's time, from the alignment heads' cross-attention over this window
                times, n = self._token_times(cross, prompts[0].tolist(), tokens, frames - seek, generation), 0
                for segment in found:
                    segment["times"] = [float(t) + offset for t in times[n:n + len(segment["tokens"])]]
                    n += len(segment["tokens"])
            yield found
            seek += advance

    def stream(self, inputs, **kwargs) -> Iterator[dict]:
        """Yield one audio input's segments ``{"timestamp": (start, end), "text"}`` while it is transcribed: the
        segments of each 30 s window as soon as the window is decoded (one window for audio up to 30 s). They are the
        ``chunks`` that ``self(inputs, return_timestamps=True, **kwargs)`` returns. Takes a call's options but
        batch_size and return_timestamps (a stream is one input's timed segments)."""
        for name in ("batch_size", "return_timestamps", "chunk_length_s", "stride_length_s"):
            if name in kwargs:
                raise InputError(f"stream() takes no {name}: it yields one input's segments with their times, "
                                 "window after window.")
        single, items = self._items(inputs)
        if not single:
            raise InputError("stream() transcribes one audio input; call the pipeline for a list.")
        _, forward, _, _ = self._params(kwargs)
        forward.pop("return_timestamps", None)  # given at construction: a stream has its times anyway
        options = {name: forward.pop(name, None) for name in ("language", "task", "prompt_ids")}
        return self._stream(self.preprocess(items), options, forward)

    def _stream(self, audio: Audio, options: dict, generation: dict) -> Iterator[dict]:
        features = audio.input_features[0] if audio.short else audio.long[0][1]  # up to 30 s: padded to 30 s
        windows = self._windows(features, options["language"], options["task"], options["prompt_ids"], generation)
        tokens, sent = [], 0
        with contextlib.closing(windows):
            for found in windows:
                tokens += [t for segment in found for t in segment["tokens"]]
                chunks = self._timed(tokens)
                closed = len(chunks) - (1 if chunks and chunks[-1]["timestamp"][1] is None else 0)
                yield from chunks[sent:closed]  # a closed segment does not change as later windows come
                sent = closed
        yield from self._timed(tokens)[sent:]

    def _timed(self, tokens: list[int]) -> list[dict]:
        return decode_asr([(tokens, None)], self.tokenizer.decode, self.rules.timestamp_begin,
                          self.rules.eos_token_id, self.time_precision, self.positions_source)

    def _token_times(self, cross: dict, prompt: list[int], tokens: list[int], frames: int, generation: dict):
        """The window's generated ``tokens`` (end-of-text left off) -> each one's time in seconds from the window's
        start, as transformers' generate times them (``token_timestamps``): the decoder's rows for the prompt and every
        generated token but the last (end-of-text, or the last when max_new_tokens cut it) give the cross-attention
        that dynamic time warping aligns with the window's first ``frames`` mel frames."""
        cut = len(tokens) >= self._decode_config(len(prompt), generation).max_new_tokens  # no end-of-text
        fed = prompt + (tokens[:-1] if cut else tokens)
        weights = self.session.alignment(cross, fed)
        width = int(self.config.get("median_filter_width", 7))
        times = token_timestamps(weights, len(prompt), frames, width, self.time_precision)
        return times[len(prompt):len(prompt) + len(tokens)]

    def _beams(self, generation: dict) -> int:
        return generation.get("num_beams", 1 if generation.get("do_sample") else self.num_beams)

    def _prompts(self, cross: dict, batch: int, language, task, timestamps: bool, prompt_ids) -> np.ndarray:
        if language is not None:
            languages = [self.rules.language_id(language)] * batch
        elif self.rules.multilingual:
            languages = self.session.detect_language(cross, batch).tolist()
        else:
            languages = [None] * batch
        return np.array([self.rules.prompt(lang, task, timestamps, prompt_ids) for lang in languages], dtype=np.int64)

    def _decode(self, cross: dict, prompts: np.ndarray, generation: dict, timestamps: bool) -> list[list[int]]:
        """Each row's generated ids after its prompt, up to (without) end-of-text."""
        config = self._decode_config(prompts.shape[1], generation)
        search = {k: generation[k] for k in SEARCH_OPTIONS if k in generation}
        beams = self._beams(generation)
        if beams > 1:
            return self.session.beam_search(cross, prompts, config, timestamps, beams, search.get("length_penalty", 1.0),
                                            search.get("early_stopping", False))
        steps = list(self.session.steps(cross, prompts, config, timestamps))
        tokens = np.stack(steps, axis=1) if steps else np.zeros((prompts.shape[0], 0), dtype=np.int64)
        eos = self.rules.eos_token_id
        return [row[:row.index(eos)] if eos in row else row for row in tokens.tolist()]

    def _decode_config(self, prompt_length: int, generation: dict) -> GenerationConfig:
        """The generation options of one decode, max_new_tokens up to the decoder's last position by default."""
        room = self.positions - prompt_length
        if room < 1:
            raise InputError(f"The prompt takes {prompt_length} of the decoder's {self.positions} positions; "
                             "shorten prompt_ids.")
        config = self.defaults.merge(**{k: v for k, v in generation.items() if k not in SEARCH_OPTIONS})
        if "max_new_tokens" not in generation:
            return config.merge(max_new_tokens=room)  # transformers: up to the decoder's last position
        if config.max_new_tokens > room:
            raise InputError(f"max_new_tokens={config.max_new_tokens} plus the {prompt_length} prompt tokens "
                             f"exceed the decoder's {self.positions} positions; use at most {room}.")
        return config

    def postprocess(self, model_inputs: Audio, outputs: dict) -> list:
        """As transformers' tokenizer decodes Whisper for its pipeline: the text of the segments between timestamps,
        put together; the segments themselves as ``chunks`` when timestamps were asked for."""
        results, language = [], outputs.get("language")
        if language is not None:  # the English name, which tells how words are split
            code = self.tokenizer.id_to_token(self.rules.language_id(language))[2:-2]
            language = LANGUAGES.get(code, code)
        for row in outputs["rows"]:
            chunks = decode_asr(row, self.tokenizer.decode, self.rules.timestamp_begin, self.rules.eos_token_id,
                                self.time_precision, self.positions_source, language)
            text = "".join(chunk["text"] for chunk in chunks)
            if outputs["timestamps"] == "word":  # as transformers: the words of every segment are the chunks
                chunks = [word for chunk in chunks for word in chunk["words"]]
            results.append({"text": text, "chunks": chunks} if outputs["timestamps"] else {"text": text})
        return results
