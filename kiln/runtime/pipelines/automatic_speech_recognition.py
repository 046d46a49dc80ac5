"""automatic-speech-recognition: audio -> text, as ``transformers.pipeline("automatic-speech-recognition")`` returns it
for Whisper: ``{"text": ...}``, and with ``return_timestamps=True`` the segments as ``chunks`` of
``{"timestamp": (start, end), "text": ...}``.

Inputs as transformers takes them: a path or URL-less file name, the file's bytes, a 1-D float array at the model's
rate (16 kHz), or ``{"raw" | "array": array, "sampling_rate": N}`` (resampled); a list of them gives a list of results.
Files are decoded with soundfile and resampled with soxr (``pip install 'kiln[audio]'``). The artifact's encoder runs
once per input (30 s window), its cross-attention keys/values stay on the engine's side for the decoder's steps.
Options: ``return_timestamps``, ``generate_kwargs`` ({"language", "task", "prompt_ids", "max_new_tokens", sampling
options}) and ``max_new_tokens`` as transformers takes them.

kiln decodes greedily (or samples): transformers 5's pipeline searches 5 beams unless the checkpoint's generation
config says otherwise, so the two agree token for token with ``generate_kwargs={"num_beams": 1}`` and may differ
by a word where two are close without it (beam search is not implemented yet).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from kiln.errors import ArtifactError, InputError
from kiln.runtime.audio import WhisperFeatureExtractor, load_audio
from kiln.runtime.engines import open_engine
from kiln.runtime.generate import GenerationConfig
from kiln.runtime.generate.whisper import TASKS, WhisperDecoding, WhisperSession
from kiln.runtime.pipelines.base import Pipeline, given
from kiln.runtime.tokenizer import Tokenizer

# generate_kwargs that are Whisper's (the rest are generation options: max_new_tokens, do_sample, temperature, ...)
WHISPER_OPTIONS = ("language", "task", "prompt_ids")
SAMPLING_OPTIONS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed", "repetition_penalty",
                    "no_repeat_ngram_size")


@dataclass
class Audio:
    """What preprocess hands on: the log-mel features of each item, and each clip's length in seconds."""

    input_features: np.ndarray  # (B, mel bins, frames)
    seconds: list[float]


class AutomaticSpeechRecognitionPipeline(Pipeline):
    task = "automatic-speech-recognition"

    def __init__(self, artifact, *, device: str = "cpu", threads: int | None = None, **kwargs):
        self._open = {"device": device, "threads": threads}  # the encoder engine opens as the decoder's
        super().__init__(artifact, device=device, threads=threads, **kwargs)

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
        self.rules = WhisperDecoding.from_dict(json.loads(path.read_text()))
        encoder = open_engine(self.path / record["model"], manifest={**self.manifest, **record}, **self._open)
        self.session = WhisperSession(encoder, self.engine, self.rules)
        self.positions = int(self.config.get("max_target_positions") or 448)
        self.defaults = GenerationConfig.from_artifact(self.path).merge(eos_token_id=self.rules.eos_token_id)
        # Seconds per timestamp token: the window over the encoder's positions (30 s / 1500 = 0.02 s).
        self.time_precision = self.feature_extractor.chunk_length / int(self.config.get("max_source_positions", 1500))

    def _sanitize_parameters(self, return_timestamps=None, generate_kwargs=None, language=None, task=None,
                             prompt_ids=None, max_new_tokens=None, do_sample=None, temperature=None, top_k=None,
                             top_p=None, seed=None, repetition_penalty=None, no_repeat_ngram_size=None,
                             num_beams=None):
        """As transformers: generation options either in ``generate_kwargs`` or as keywords of their own."""
        if return_timestamps not in (None, True, False):
            raise InputError(f"return_timestamps={return_timestamps!r}: kiln gives segment timestamps (True) or none "
                             "(False); word timestamps ('word') are not implemented yet.")
        if not isinstance(generate_kwargs or {}, dict):
            raise InputError(f"generate_kwargs must be a dict, got {type(generate_kwargs).__name__}.")
        generation = dict(generate_kwargs or {})
        unknown = sorted(set(generation) - set(WHISPER_OPTIONS) - set(SAMPLING_OPTIONS) - {"num_beams"})
        if unknown:
            raise InputError(f"Unknown generate_kwargs {unknown}; kiln's Whisper takes "
                             f"{', '.join(WHISPER_OPTIONS + SAMPLING_OPTIONS)}.")
        keywords = given(language=language, task=task, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
                         do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                         repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                         num_beams=num_beams)
        twice = sorted(set(keywords) & set(generation))
        if twice:
            raise InputError(f"{', '.join(twice)} given twice, as an option and in generate_kwargs; give it once.")
        generation.update(keywords)
        beams = generation.pop("num_beams", 1)
        if beams != 1:
            raise InputError(f"num_beams={beams!r}: kiln decodes Whisper greedily or by sampling (num_beams=1); "
                             "beam search is not implemented yet. transformers' pipeline searches 5 beams by "
                             "default, so its text can differ where two words are close.")
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
        self.defaults.merge(**generation)  # checks the values now
        forward = {**given(return_timestamps=return_timestamps), **given(**whisper), **given(**generation)}
        return {}, forward, {}

    def _items(self, inputs) -> tuple[bool, list]:
        if isinstance(inputs, (list, tuple)):
            if not inputs:
                raise InputError("Got an empty list of audio inputs; pass a file, bytes, an array or a list of them.")
            return False, list(inputs)
        return True, [inputs]

    def preprocess(self, items: list) -> Audio:
        rate = self.feature_extractor.sampling_rate
        clips = [load_audio(item, sampling_rate=rate) for item in items]
        seconds = [len(clip) / rate for clip in clips]
        longest = max(seconds)
        if longest > self.feature_extractor.chunk_length:
            raise InputError(f"The audio is {longest:.1f} s long; kiln's Whisper pipeline transcribes up to "
                             f"{self.feature_extractor.chunk_length} s per input (one window) for now. Split longer "
                             "audio into pieces of at most that length.")
        return Audio(self.feature_extractor(clips)["input_features"], seconds)

    def forward(self, model_inputs: Audio, batch_size: int, return_timestamps: bool = False, language=None,
                task=None, prompt_ids=None, **generation) -> dict:
        B = model_inputs.input_features.shape[0]
        cross = self.session.encode(model_inputs.input_features)
        if language is not None:
            languages = [self.rules.language_id(language)] * B
        elif self.rules.multilingual:
            languages = self.session.detect_language(cross, B).tolist()
        else:
            languages = [None] * B
        prompts = np.array([self.rules.prompt(lang, task, bool(return_timestamps), prompt_ids)
                            for lang in languages], dtype=np.int64)
        room = self.positions - prompts.shape[1]
        if room < 1:
            raise InputError(f"The prompt takes {prompts.shape[1]} of the decoder's {self.positions} positions; "
                             "shorten prompt_ids.")
        config = self.defaults.merge(**generation)
        if "max_new_tokens" not in generation:
            config = config.merge(max_new_tokens=room)  # transformers: up to the decoder's last position
        elif config.max_new_tokens > room:
            raise InputError(f"max_new_tokens={config.max_new_tokens} plus the {prompts.shape[1]} prompt tokens "
                             f"exceed the decoder's {self.positions} positions; use at most {room}.")
        steps = list(self.session.steps(cross, prompts, config, bool(return_timestamps)))
        tokens = np.stack(steps, axis=1) if steps else np.zeros((B, 0), dtype=np.int64)
        return {"tokens": tokens, "timestamps": bool(return_timestamps)}

    def postprocess(self, model_inputs: Audio, outputs: dict) -> list:
        results = []
        for row in outputs["tokens"].tolist():
            if self.rules.eos_token_id in row:
                row = row[:row.index(self.rules.eos_token_id)]
            if outputs["timestamps"]:
                text = self.tokenizer.decode([t for t in row if t < self.rules.eos_token_id])
                results.append({"text": text, "chunks": self._segments(row)})
            else:
                results.append({"text": self.tokenizer.decode(row, skip_special_tokens=True)})
        return results

    def _segments(self, tokens: list[int]) -> list[dict]:
        """Text between timestamp tokens -> chunks ``{"timestamp": (start, end), "text"}``, as transformers'
        tokenizer decodes Whisper's output with offsets: a segment opens at a timestamp and closes at the next one;
        a segment the decoder did not close ends at None."""
        begin = self.rules.timestamp_begin
        chunks, start, text = [], None, []
        for token in tokens:
            if token >= begin:
                time = round((token - begin) * self.time_precision, 2)
                if start is None:
                    start = time
                else:
                    if text:
                        chunks.append({"timestamp": (start, time), "text": self.tokenizer.decode(text)})
                    start, text = None, []
            elif token < self.rules.eos_token_id:  # text (special tokens are left out, as skip_special_tokens)
                text.append(token)
        if text:
            chunks.append({"timestamp": (start, None), "text": self.tokenizer.decode(text)})
        return chunks
