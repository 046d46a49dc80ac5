"""Whisper's decoding rules in numpy, as transformers' ``WhisperForConditionalGeneration.generate`` applies them
(short-form: one 30 s window), for the runtime's encoder-decoder loop.

- The decoder prompt: ``<|startoftranscript|>``, the language (given, or detected from the first step's logits over
  the language tokens), the task (``<|transcribe|>`` / ``<|translate|>``), ``<|notimestamps|>`` unless timestamps are
  asked for; a text prompt before it behind ``<|startofprev|>``. English-only checkpoints (".en") have no language or
  task tokens.
- ``suppress_tokens`` at every step, ``begin_suppress_tokens`` at the first generated position.
- With timestamps, the timestamp rules of ``WhisperTimeStampLogitsProcessor``: timestamps come in pairs (after a
  lone timestamp, another or end-of-text; after a pair, text), never decrease, the first token is a timestamp no later
  than ``max_initial_timestamp_index`` (1 s), and a timestamp is forced when the timestamps' total probability beats
  every single text token's.

They run after the generic processors (repetition penalty, n-grams, minimum length) and before sampling's warpers,
the order transformers' generate builds. Read from the artifact's ``generation_config.json``.

Audio longer than one window is transcribed sequentially, as openai's ``transcribe`` and transformers' long-form
``generate`` do: decode a 30 s window with timestamps, keep the segments the decoder closed, move the window to the
last closed timestamp (or by the whole window when the decoder ended on a lone timestamp: no speech after it), and
go on from there (``split_segments``). ``chunks_from_tokens`` turns the concatenated tokens back into text and
timed segments, as transformers' tokenizer does for its pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kiln.errors import ConfigError, InputError

# Whisper's languages: code -> English name (the language tokens are "<|code|>"), and the other names transformers
# accepts for some of them.
LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin", "mi": "maori",
    "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian", "lv": "latvian",
    "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian",
    "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian", "ne": "nepali",
    "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili", "gl": "galician",
    "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona", "yo": "yoruba", "so": "somali",
    "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi",
    "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek", "fo": "faroese",
    "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese", "sa": "sanskrit",
    "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog", "mg": "malagasy", "as": "assamese",
    "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa", "ba": "bashkir", "jw": "javanese",
    "su": "sundanese", "yue": "cantonese",
}
LANGUAGE_ALIASES = {"burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht", "letzeburgesch": "lb",
                    "pushto": "ps", "panjabi": "pa", "moldavian": "ro", "moldovan": "ro", "sinhalese": "si",
                    "castilian": "es", "mandarin": "zh"}
TASKS = ("transcribe", "translate")


def _token_list(raw: dict, key: str) -> tuple[int, ...]:
    value = raw.get(key) or ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ConfigError(f"generation_config.json '{key}' must be a list of token ids, got {value!r:.80}.")
    return tuple(value)


def _token_map(raw: dict, key: str) -> dict[str, int]:
    value = raw.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value.values()):
        raise ConfigError(f"generation_config.json '{key}' must map token strings to ids, got {value!r:.80}.")
    return dict(value)


def _optional_id(raw: dict, key: str) -> int | None:
    value = raw.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ConfigError(f"generation_config.json '{key}' must be a token id, got {value!r:.80}.")
    return value


@dataclass(frozen=True)
class WhisperDecoding:
    """What Whisper's rules read from generation_config.json."""

    decoder_start_token_id: int  # <|startoftranscript|>
    eos_token_id: int  # <|endoftext|>
    no_timestamps_token_id: int | None = None  # timestamps are the ids after it (<|0.00|>, <|0.02|>, ...)
    prev_sot_token_id: int | None = None  # <|startofprev|>, before a text prompt
    lang_to_id: dict[str, int] = field(default_factory=dict)  # "<|en|>" -> id; empty for English-only models
    task_to_id: dict[str, int] = field(default_factory=dict)  # "transcribe" -> id
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    max_initial_timestamp_index: int | None = None
    alignment_heads: tuple[tuple[int, int], ...] = ()  # (layer, head) of the cross-attention that aligns words

    @classmethod
    def from_dict(cls, raw: dict) -> "WhisperDecoding":
        """From a generation_config.json dict, checked (token ids must be ints, the start and end ids present)."""
        start, eos = _optional_id(raw, "decoder_start_token_id"), raw.get("eos_token_id")
        if isinstance(eos, list) and len(eos) == 1:
            eos = eos[0]
        if start is None or not isinstance(eos, int) or isinstance(eos, bool):
            raise ConfigError("generation_config.json must name Whisper's decoder_start_token_id and one "
                              f"eos_token_id; got {start!r} and {eos!r}. Copy it from the original checkpoint.")
        max_initial = raw.get("max_initial_timestamp_index")
        if max_initial is not None and (not isinstance(max_initial, int) or isinstance(max_initial, bool)
                                        or max_initial < 0):
            raise ConfigError(f"generation_config.json 'max_initial_timestamp_index' must be a non-negative "
                              f"integer, got {max_initial!r}.")
        heads = raw.get("alignment_heads") or ()
        if not isinstance(heads, (list, tuple)) or not all(
                isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(i, int) for i in h) for h in heads):
            raise ConfigError(f"generation_config.json 'alignment_heads' must be [layer, head] pairs, got "
                              f"{heads!r:.80}.")
        return cls(start, eos, _optional_id(raw, "no_timestamps_token_id"), _optional_id(raw, "prev_sot_token_id"),
                   _token_map(raw, "lang_to_id"), _token_map(raw, "task_to_id"), _token_list(raw, "suppress_tokens"),
                   _token_list(raw, "begin_suppress_tokens"), max_initial, tuple(tuple(h) for h in heads))

    @property
    def timestamp_begin(self) -> int:
        """The id of <|0.00|>: every id from here on is a timestamp, 0.02 s apart."""
        if self.no_timestamps_token_id is None:
            raise ConfigError("This Whisper's generation_config.json has no 'no_timestamps_token_id', so kiln cannot "
                              "tell timestamps from text; copy the file from the original checkpoint.")
        return self.no_timestamps_token_id + 1

    @property
    def multilingual(self) -> bool:
        return bool(self.lang_to_id)

    def language_id(self, language: str) -> int:
        """The token of a language given as a code ("fr"), a token ("<|fr|>") or an English name ("french")."""
        if not isinstance(language, str):
            raise InputError(f"language must be a string such as 'fr' or 'french', got {language!r:.50}.")
        name = language.lower().strip()
        code = name[2:-2] if name.startswith("<|") and name.endswith("|>") else name
        code = LANGUAGE_ALIASES.get(code, code)
        code = next((c for c, n in LANGUAGES.items() if n == code), code)
        if not self.multilingual:
            raise InputError("This Whisper model is English-only (a '.en' checkpoint): it takes no language. Leave "
                             "language unset, or use a multilingual checkpoint.")
        if f"<|{code}|>" not in self.lang_to_id:
            known = sorted(t[2:-2] for t in self.lang_to_id)
            raise InputError(f"Unsupported language {language!r}; this model knows {', '.join(known)} (codes or "
                             "English names).")
        return self.lang_to_id[f"<|{code}|>"]

    def task_id(self, task: str) -> int:
        if task not in TASKS:
            raise InputError(f"Whisper's task is 'transcribe' or 'translate' (to English), got {task!r:.50}.")
        if task not in self.task_to_id:
            raise InputError(f"This Whisper model has no {task!r} task token (English-only models only transcribe).")
        return self.task_to_id[task]

    def prompt(self, language_id: int | None = None, task: str | None = None, timestamps: bool = False,
               prompt_ids: list[int] | None = None) -> list[int]:
        """The decoder's first tokens for one row, as transformers builds them: [<|startofprev|>, prompt...]
        <|startoftranscript|> [<|lang|>] [<|task|>] [<|notimestamps|>]. ``language_id`` None on a multilingual
        model: detect it first (``detect_language``). Without a task a multilingual model transcribes: transformers
        does so from a given language, or from the checkpoints' ``forced_decoder_ids`` ([[1, null], [2,
        <|transcribe|>]]) when neither is given, as openai's decoder always does."""
        tokens = [self.decoder_start_token_id]
        if language_id is not None:
            tokens.append(language_id)
        if task is not None or self.task_to_id:
            tokens.append(self.task_id(task or "transcribe"))
        if not timestamps:
            if self.no_timestamps_token_id is None:
                raise ConfigError("generation_config.json has no 'no_timestamps_token_id'; copy it from the original "
                                  "checkpoint.")
            tokens.append(self.no_timestamps_token_id)
        if prompt_ids:
            if self.prev_sot_token_id is None:
                raise ConfigError("generation_config.json has no 'prev_sot_token_id' (<|startofprev|>), which a text "
                                  "prompt goes behind; copy it from the original checkpoint.")
            prompt = list(prompt_ids)
            tokens = ([] if prompt[0] == self.prev_sot_token_id else [self.prev_sot_token_id]) + prompt + tokens
        return tokens

    def detect_language(self, logits: np.ndarray) -> np.ndarray:
        """(B, V) logits of the step after <|startoftranscript|> -> (B,) the most likely language token per row."""
        ids = np.array(sorted(self.lang_to_id.values()), dtype=np.int64)
        return ids[np.asarray(logits)[:, ids].argmax(axis=-1)]

    def process(self, scores: np.ndarray, generated: np.ndarray, begin_index: int, timestamps: bool) -> np.ndarray:
        """(B, V) scores after the generic processors -> Whisper's rules applied. ``generated`` (B, N) holds the
        prompt (``begin_index`` tokens) and what was generated after it."""
        out = np.array(scores, dtype=np.float32)
        first = generated.shape[1] == begin_index
        if first and self.begin_suppress_tokens:
            out[:, [t for t in self.begin_suppress_tokens if t < out.shape[1]]] = -np.inf
        if self.suppress_tokens:
            out[:, [t for t in self.suppress_tokens if t < out.shape[1]]] = -np.inf
        return self._timestamp_rules(out, generated, begin_index) if timestamps else out

    def _timestamp_rules(self, out: np.ndarray, generated: np.ndarray, begin_index: int) -> np.ndarray:
        begin, eos = self.timestamp_begin, self.eos_token_id
        out[:, self.no_timestamps_token_id] = -np.inf
        for b, row in enumerate(np.asarray(generated)):
            seq = row[begin_index:]
            last = len(seq) >= 1 and seq[-1] >= begin
            penultimate = len(seq) < 2 or seq[-2] >= begin
            if last:
                if penultimate:  # a pair just closed (or the first timestamp): text must follow
                    out[b, begin:] = -np.inf
                else:  # an opened segment: its closing timestamp (or end of text), not text
                    out[b, :eos] = -np.inf
            stamps = seq[seq >= begin]
            floor = begin  # timestamps never go back; a closing one may repeat the opening one
            if len(stamps):
                floor = stamps[-1] if last and not penultimate else stamps[-1] + 1
            out[b, begin:floor] = -np.inf
        if generated.shape[1] == begin_index:  # the first token is a timestamp, within the first second
            out[:, :begin] = -np.inf
            if self.max_initial_timestamp_index is not None:
                out[:, begin + self.max_initial_timestamp_index + 1:] = -np.inf
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            shifted = out - out.max(axis=-1, keepdims=True)
            logprobs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
            top = logprobs[:, begin:].max(axis=-1, keepdims=True)
            timestamp = (top + np.log(np.exp(logprobs[:, begin:] - top).sum(axis=-1, keepdims=True)))[:, 0]
            text = logprobs[:, :begin].max(axis=-1)
            force = timestamp > text  # the timestamps together are likelier than any one text token
        out[force, :begin] = -np.inf
        return out


class WhisperSession:
    """An encoder-decoder artifact's two engines and Whisper's loop over them: the encoder once per 30 s window,
    its cross-attention keys/values kept on the engine's side (handles, bound into every decoder step without a copy
    through numpy), then the decoder's prefill and decode steps over its own cache (``DecoderSession``)."""

    def __init__(self, encoder, decoder, rules: WhisperDecoding):
        from kiln.runtime.generate.loop import DecoderSession

        self.encoder, self.rules = encoder, rules
        self.decoder = DecoderSession(decoder)
        self.cross_names = [i.name for i in decoder.inputs() if i.name.startswith("cross_key_values.")]
        produced = {o.name for o in encoder.outputs()}
        if not self.cross_names or not set(self.cross_names) <= produced:
            raise InputError("This artifact's encoder and decoder graphs do not fit together (the decoder's "
                             "cross_key_values inputs are not the encoder's outputs); re-export it.")

    def encode(self, input_features: np.ndarray, handles: bool = True) -> dict:
        """(B, mel bins, frames) -> the cross-attention keys/values as engine handles, for ``steps`` (numpy arrays
        with ``handles=False``, for ``beam_search``)."""
        return self.encoder.run({"input_features": np.asarray(input_features, dtype=np.float32)},
                                outputs=self.cross_names, keep=self.cross_names if handles else ())

    def detect_language(self, cross: dict, batch: int) -> np.ndarray:
        """(B,) the language token each row's audio is most likely in: one decoder step after
        <|startoftranscript|>, over the language tokens only, as transformers' detect_language."""
        if not self.rules.multilingual:
            raise InputError("This Whisper model is English-only; it has no languages to detect.")
        start = np.full((batch, 1), self.rules.decoder_start_token_id, dtype=np.int64)
        ones, zeros = np.ones((batch, 1), dtype=np.int64), np.zeros((batch, 1), dtype=np.int64)
        logits, _ = self.decoder.step(start, ones, zeros, {**self.decoder.empty_cache(batch), **cross})
        return self.rules.detect_language(logits)

    def alignment(self, cross: dict, tokens: list[int]) -> np.ndarray:
        """The alignment heads' cross-attention probabilities (heads, len(tokens), encoder positions) of one row of
        ``tokens`` (the prompt and what was generated after it) fed at once over an empty cache, against its window's
        ``cross`` keys/values (batch 1): the rows transformers collects step by step while it generates (the decoder is
        causal, so each token's row is the same), for word timestamps."""
        if "alignment_weights" not in {o.name for o in self.decoder.engine.outputs()}:
            raise InputError("This artifact's decoder graph has no alignment_weights output, so it cannot time words: "
                             "the checkpoint's generation_config.json had no 'alignment_heads' when it was exported. "
                             "Add them (openai's per model size) and export again, or ask for segment timestamps.")
        ids = np.array([tokens], dtype=np.int64)
        out = self.decoder.forward(ids, np.ones_like(ids), np.arange(len(tokens), dtype=np.int64)[None],
                                   {**self.decoder.empty_cache(1), **cross}, ["alignment_weights"])
        return np.asarray(out["alignment_weights"][0], dtype=np.float32)

    def steps(self, cross: dict, prompts: np.ndarray, config, timestamps: bool = False):
        """Yield each step's new tokens (B,) after the decoder prompts (B, T) (all rows of one length), with the
        generic processors of ``config`` (a GenerationConfig), then Whisper's rules, then greedy or sampled choice.
        Rows that finished get the end-of-text token; stops when every row has or at ``config.max_new_tokens``."""
        from kiln.runtime.generate.processors import process_logits, select_next

        B, begin = prompts.shape
        rng, eos = config.rng(), self.rules.eos_token_id
        generated, mask = prompts.astype(np.int64), np.ones(prompts.shape, dtype=np.int64)
        step_ids, positions = generated, np.broadcast_to(np.arange(begin, dtype=np.int64), (B, begin))
        cache, done = {**self.decoder.empty_cache(B), **cross}, np.zeros(B, dtype=bool)
        try:
            for new in range(config.max_new_tokens):
                logits, cache = self.decoder.step(step_ids, mask, positions, cache)
                cache.update(cross)
                scores = process_logits(logits, generated, config, new_tokens=new,
                                        rules=lambda s: self.rules.process(s, generated, begin, timestamps))
                tokens = np.where(done, eos, select_next(scores, config, rng)).astype(np.int64)
                generated = np.concatenate([generated, tokens[:, None]], axis=1)
                done |= tokens == eos
                yield tokens
                if done.all():
                    break
                step_ids, positions = tokens[:, None], positions[:, -1:] + 1
                mask = np.ones((B, generated.shape[1]), dtype=np.int64)
        finally:
            self.decoder.release()

    def beam_search(self, cross: dict, prompts: np.ndarray, config, timestamps: bool = False, num_beams: int = 5,
                    length_penalty: float = 1.0, early_stopping: bool | str = False) -> list[list[int]]:
        """Each row's best sequence of new tokens (without end-of-text) by beam search, as transformers' generate
        runs it (``kiln.runtime.generate.beam``), Whisper's rules after the generic processors. ``cross``: numpy
        keys/values (``encode(..., handles=False)``), one row per input, bound for every beam; ``prompts`` (B, P)."""
        from kiln.runtime.generate.beam import beam_search

        return beam_search(self.decoder, prompts, np.ones(prompts.shape, dtype=np.int64),
                           config.merge(eos_token_id=self.rules.eos_token_id), num_beams, length_penalty, feed=cross,
                           rules=lambda scores, sequences, begin: self.rules.process(scores, sequences, begin,
                                                                                    timestamps),
                           early_stopping=early_stopping)


def split_segments(tokens: list[int], timestamp_begin: int, window_frames: int, time_offset: float = 0.0,
                   time_precision: float = 0.02, input_stride: int = 2) -> tuple[list[dict], int]:
    """One window's generated tokens (prompt and end-of-text removed) -> (segments, mel frames to move the window),
    as transformers' ``_retrieve_segment`` (openai's ``transcribe``): a pair of timestamps ends a segment; what follows
    the last pair is cut off mid-speech, dropped, and decoded again from the next window, which starts at that pair.
    A lone timestamp at the end means no speech after it: the next window starts after this one. Without a pair the
    whole window is one segment. Each segment: ``{"start", "end"}`` in seconds (``time_offset`` = the window's start)
    and its ``tokens``. ``window_frames``: the window's mel frames that hold audio (3000, less for the last)."""
    begin, stamp = timestamp_begin, [t >= timestamp_begin for t in tokens]
    single_ending = stamp[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(stamp) - 1) if stamp[i] and stamp[i + 1]]
    if not cuts:
        stamps = [t for t in tokens if t >= begin]
        end = window_frames // input_stride  # the window's end in timestamp positions (a position = 2 mel frames)
        if stamps and stamps[-1] != begin:  # no pair, but a timestamp: the segment ends there
            end = stamps[-1] - begin
        return [{"start": time_offset, "end": time_offset + end * time_precision, "tokens": list(tokens)}], window_frames
    if single_ending:
        cuts.append(len(tokens))
    else:
        cuts[-1] += 1  # the last segment keeps both timestamps of its pair: it was not a lone ending
    segments, last = [], 0
    for n, cut in enumerate(cuts):
        piece = list(tokens[last:cut])
        closing = piece[-1] if n < len(cuts) - 1 or single_ending else piece[-2]
        segments.append({"start": time_offset + (piece[0] - begin) * time_precision,
                         "end": time_offset + (closing - begin) * time_precision, "tokens": piece})
        last = cut
    if single_ending:
        return segments, window_frames
    advance = (tokens[last - 2] - begin) * input_stride
    # A window whose last pair is at 0.00 would not move; openai's and transformers' loops would decode it forever.
    return segments, advance if advance > 0 else window_frames


def chunks_from_tokens(tokens: list[int], decode, timestamp_begin: int, eos_token_id: int,
                       time_precision: float = 0.02, window_positions: int = 1500) -> list[dict]:
    """Generated tokens (one window's, or long-form's windows one after another) -> ``[{"timestamp": (start, end),
    "text"}]``, as transformers' tokenizer (``_decode_asr``) cuts them for its pipeline: a segment opens at a
    timestamp and closes at the next one that differs; text after the last one is a segment that ends at None; ids
    from end-of-text up to the timestamps (the special tokens) are left out. Across windows the times go on: a
    timestamp lower than the one before starts the next window, which began at the last closed pair, or 30 s
    (``window_positions`` timestamps) after the last window's start when that ended on a lone timestamp.
    Without timestamps: one segment of all the text, its times None."""
    return decode_asr([(tokens, None)], decode, timestamp_begin, eos_token_id, time_precision, window_positions)


def decode_asr(outputs: list[tuple], decode, timestamp_begin: int, eos_token_id: int, time_precision: float = 0.02,
               window_positions: int = 1500, language: str | None = None) -> list[dict]:
    """``chunks_from_tokens`` over the outputs of overlapping chunks (transformers' pipeline's ``chunk_length_s``):
    ``(tokens, stride)`` per chunk, ``stride`` = (chunk seconds, left overlap, right overlap) or None. As
    transformers' ``_decode_asr``: the times of each chunk are shifted by where it starts; a timestamp in the right
    overlap is not a boundary (the next chunk, which hears that audio in its middle, decides), one in the left overlap
    neither; the texts of the chunks a segment spans are merged where they overlap (``longest_common_sequence``).
    ``(tokens, stride, times)`` with each token's time in seconds (``token_timestamps``): every segment also has its
    ``words``, each timed from the end of the token before its first to the end of its last (``words_from_tokens``;
    ``language`` picks how words are told apart)."""
    def segment():
        return {"timestamp": [None, None], "text": ""}

    def close(chunk: dict, previous: list, previous_times: list) -> dict:
        if not timed:
            chunk["text"] = decode(longest_common_sequence(previous))
            return chunk
        tokens, times = longest_common_sequence(previous, previous_times)
        chunk["text"], chunk["words"] = decode(tokens), words_from_tokens(tokens, times, decode, language)
        return chunk

    timed = any(len(output) > 2 and output[2] is not None for output in outputs)
    chunks, chunk, previous, previous_times, skip, time_offset = [], segment(), [], [], False, 0.0
    for tokens, stride, *rest in outputs:
        tokens, times = list(tokens), (list(rest[0]) if rest and rest[0] is not None else None)
        last_timestamp, first_timestamp = None, timestamp_begin
        latest = offset = penultimate = 0.0
        if stride is not None:
            length, left, right = stride
            time_offset -= left
            right_start = length - right
            if left:
                first_timestamp = left / time_precision + timestamp_begin
            if right:
                for token in reversed(tokens):  # the timestamps in the right overlap; the last one always goes
                    if token >= timestamp_begin:
                        if last_timestamp is not None and (token - timestamp_begin) * time_precision < right_start:
                            break
                        last_timestamp = token
        current, current_times = [], []
        for i, token in enumerate(tokens):
            if eos_token_id <= token < timestamp_begin:
                continue  # special tokens
            if token < timestamp_begin:
                current.append(token)
                if timed:
                    start = round((times[i - 1] if i else 0.0) + time_offset, 2)
                    current_times.append((start, round(times[i] + time_offset, 2)))
                continue
            stamp = float((token - timestamp_begin) * time_precision)
            if stamp < latest:  # the next window started
                lone = i >= 2 and not (tokens[i - 1] >= timestamp_begin and tokens[i - 2] >= timestamp_begin)
                if lone:
                    offset += time_precision * window_positions
                else:
                    latest = penultimate
                    offset += penultimate
            penultimate, latest = latest, stamp
            time = round((token - timestamp_begin) * time_precision + time_offset + offset, 2)
            if last_timestamp and token >= last_timestamp:
                skip = True  # in the right overlap: not a boundary, nor the one paired with it
            elif skip or (previous and token < first_timestamp):
                skip = False
            elif chunk["timestamp"][0] is None:
                chunk["timestamp"][0] = time
            elif time != chunk["timestamp"][0]:  # an equal one is the model repeating the opening: it opens
                chunk["timestamp"][1] = time
                previous.append(current)
                previous_times.append(current_times)
                chunks.append(close(chunk, previous, previous_times))
                previous, previous_times, current, current_times, chunk = [], [], [], [], segment()
        if stride is not None:
            time_offset += length - right
        if current:
            previous.append(current)
            previous_times.append(current_times)
        elif not any(previous):
            previous, previous_times, chunk = [], [], segment()
    if previous:
        chunks.append(close(chunk, previous, previous_times))
    return [{"timestamp": tuple(c["timestamp"]), "text": c["text"], **({"words": c["words"]} if timed else {})}
            for c in chunks]


def longest_common_sequence(sequences: list[list[int]], times: list[list[tuple]] | None = None):
    """Token lists of overlapping chunks, in order -> one list, as transformers' Whisper tokenizer merges them
    (``_find_longest_common_sequence``): each next list is slid along the end of what came before, the alignment
    with the most matching tokens (more than one, ties to the longer overlap) is taken, and the overlap is split in
    its middle, the left half from the earlier chunk, the right half from the later one. With ``times`` (each
    token's (start, end), list by list) a match also needs the left token's times no later than the right one's,
    and the times are merged alike: returns (tokens, times)."""
    left = list(sequences[0])
    left_times = list(times[0]) if times else []
    total, total_times = [], []
    for n, right in enumerate(sequences[1:], start=1):
        best, where = 0.0, (len(left), len(left), 0, 0)
        for i in range(1, len(left) + len(right)):
            left_start, left_stop = max(0, len(left) - i), min(len(left), len(left) + len(right) - i)
            right_start, right_stop = max(0, i - len(left)), min(len(right), i)
            if times:
                matches = sum(1 for k, token in enumerate(left[left_start:left_stop])
                              if token == right[right_start + k]
                              and left_times[left_start + k] <= times[n][right_start + k])
            else:
                matches = int(np.sum(np.array(left[left_start:left_stop]) == np.array(right[right_start:right_stop])))
            score = matches / i + i / 10000.0  # the epsilon favours long perfect matches
            if matches > 1 and score > best:
                best, where = score, (left_start, left_stop, right_start, right_stop)
        left_start, left_stop, right_start, right_stop = where
        total.extend(left[:(left_stop + left_start) // 2])
        left = list(right[(right_stop + right_start) // 2:])
        if times:
            total_times.extend(left_times[:(left_stop + left_start) // 2])
            left_times = list(times[n][(right_stop + right_start) // 2:])
    if times is None:
        return total + left
    return total + left, total_times + left_times


# Word timestamps: punctuation joined to the word after it (prepended) or before it (appended), as openai's and
# transformers' defaults; languages written without spaces between words are split where characters end.
PREPENDED, APPENDED = "\"'“¡¿([{-", "\"'.。,，!！?？:：”)]}、"
UNSPACED = {"chinese", "japanese", "thai", "lao", "myanmar", "cantonese"}
PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def words_from_tokens(tokens: list[int], times: list[tuple], decode, language: str | None = None) -> list[dict]:
    """Text tokens and their (start, end) seconds -> ``[{"text": word, "timestamp": (start, end)}]``, as
    transformers' ``_collate_word_timestamps``: tokens are put together until they decode to whole characters; a
    piece that starts with a space, or is punctuation, starts a word (for languages written with spaces; every
    character is one otherwise), punctuation then joins its neighbour (``PREPENDED`` / ``APPENDED``); a word runs
    from its first token's start to its last token's end. ``language``: an English name ("japanese"); None is
    English, as transformers' pipeline takes it."""
    full, pieces, current, offset = decode(tokens), [], [], 0
    for index in range(len(tokens)):
        current.append(index)
        text = decode([tokens[k] for k in current])
        bad = text.find("\ufffd")
        if bad < 0 or offset + bad >= len(full) or full[offset + bad] == "\ufffd":
            pieces.append([text, current])
            current, offset = [], offset + len(text)
    if (language or "english") in UNSPACED:
        words = pieces
    else:
        words = []
        for text, indices in pieces:
            if text.startswith(" ") or text.strip() in PUNCTUATION or not words:
                words.append([text, list(indices)])
            else:
                words[-1][0] += text
                words[-1][1] += indices
    i, j = len(words) - 2, len(words) - 1
    while i >= 0:  # an opening quote or bracket joins the word after it
        if words[i][0].startswith(" ") and words[i][0].strip() in PREPENDED:
            words[j] = [words[i][0] + words[j][0], words[i][1] + words[j][1]]
            words[i] = ["", []]
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(words):  # a full stop, comma or closing quote joins the word before it
        if not words[i][0].endswith(" ") and words[j][0] in APPENDED:
            words[i] = [words[i][0] + words[j][0], words[i][1] + words[j][1]]
            words[j] = ["", []]
        else:
            i = j
        j += 1
    return [{"text": text, "timestamp": (times[indices[0]][0], times[indices[-1]][1])}
            for text, indices in words if text and indices]


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """The median of each ``width`` (odd) values along the last axis, its edges reflected, as transformers'
    ``_median_filter``; ``x`` unchanged when that axis is not longer than ``width // 2``."""
    if width <= 0 or width % 2 != 1:
        raise ConfigError(f"median_filter_width must be an odd number, got {width!r} (config.json).")
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    return np.sort(np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1), axis=-1)[..., pad]


def dynamic_time_warping(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through ``matrix`` (tokens, time): (token index, time index) per step, as
    transformers' ``_dynamic_time_warping`` (the same float32 costs and ties: diagonal, then up, then left). Filled one
    anti-diagonal at a time (every cell of one depends on the two before only), so it costs tokens + times numpy
    steps rather than their product."""
    T, E = matrix.shape
    cost = np.full((T + 1, E + 1), np.inf, dtype=np.float32)
    trace = -np.ones((T + 1, E + 1), dtype=np.float32)
    cost[0, 0] = 0
    for k in range(2, T + E + 1):  # cells (i, j) with i + j = k
        i = np.arange(max(1, k - E), min(T, k - 1) + 1)
        j = k - i
        c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
        t = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        cost[i, j] = matrix[i - 1, j - 1] + np.choose(t, [c0, c1, c2])
        trace[i, j] = t
    trace[0, :], trace[:, 0] = 2, 1
    i, j, text, time = T, E, [], []
    while i > 0 or j > 0:
        text.append(i - 1)
        time.append(j - 1)
        step = trace[i, j]
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    return np.array(text[::-1]), np.array(time[::-1])


def token_timestamps(weights: np.ndarray, prompt_length: int, frames: int | None = None, median_filter_width: int = 7,
                     time_precision: float = 0.02) -> np.ndarray:
    """Seconds per token from the alignment heads' cross-attention, as transformers' ``_extract_token_timestamps``
    (openai's ``find_alignment``): ``weights`` (heads, rows, encoder positions) of the tokens fed (the prompt, then
    each generated token but the last), cut to the audio's ``frames`` // 2 positions, the prompt's rows dropped; each
    position's weights normalized over the tokens, median-filtered over time, averaged over the heads; the cheapest
    monotonic path through their negation (``dynamic_time_warping``) gives each token the time where the path first
    reaches it. Returns ``prompt_length + rows - prompt_length + 1`` times: 0 for the prompt, then one per generated
    token, the last repeated for the token that was not fed (end-of-text)."""
    if frames is not None:
        weights = weights[..., :frames // 2]
    weights = weights[:, prompt_length:]
    if weights.shape[1] == 0:
        return np.zeros(prompt_length + 1)
    with np.errstate(divide="ignore", invalid="ignore"):  # one token: its deviation is 0, as in transformers
        weights = (weights - weights.mean(axis=-2, keepdims=True)) / weights.std(axis=-2, keepdims=True)
    matrix = median_filter(weights, median_filter_width).mean(axis=0)
    text, time = dynamic_time_warping(-matrix.astype(np.float64))
    jumps = np.pad(np.diff(text), (1, 0), constant_values=1).astype(bool)
    times = time[jumps] * time_precision
    return np.concatenate([np.zeros(prompt_length), times, times[-1:]])
