"""Whisper's decoding rules (kiln/runtime/generate/whisper.py) against transformers: the processors on random scores
and sequences, and whole greedy decodes of a tiny random Whisper (kiln's reference + kiln's rules vs transformers'
WhisperForConditionalGeneration.generate): language detection, forced language and task, timestamps, a prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.errors import ConfigError, InputError
from kiln.graphs.checkpoint import from_pretrained
from kiln.runtime.generate import GenerationConfig, process_logits
from kiln.runtime.generate.whisper import (WhisperDecoding, chunks_from_tokens, decode_asr, dynamic_time_warping,
                                          longest_common_sequence, median_filter, split_segments, token_timestamps,
                                          words_from_tokens)

transformers = pytest.importorskip("transformers")

from whisper_tiny import (EOS, GENERATION, LANGS, NO_TIMESTAMPS, PREV, SOT, TRANSCRIBE, TRANSLATE,  # noqa: E402
                          VOCAB, features, save_tiny_whisper, tiny_tokenizer, until_eos)

RULES = WhisperDecoding.from_dict(GENERATION)


def hf_processors(begin_index: int, timestamps: bool):
    from transformers.generation.logits_process import (SuppressTokensAtBeginLogitsProcessor,
                                                        SuppressTokensLogitsProcessor,
                                                        WhisperTimeStampLogitsProcessor)

    config = transformers.GenerationConfig(**GENERATION)
    procs = [SuppressTokensAtBeginLogitsProcessor(GENERATION["begin_suppress_tokens"], begin_index),
             SuppressTokensLogitsProcessor(GENERATION["suppress_tokens"])]
    return procs + ([WhisperTimeStampLogitsProcessor(config, begin_index)] if timestamps else [])


def random_sequence(rng, begin_index: int, length: int) -> list[int]:
    """A prompt, then text and timestamps in the shapes the rules distinguish (pairs, lone stamps, text)."""
    seq = [SOT, 103, TRANSCRIBE][:begin_index]
    stamp = NO_TIMESTAMPS + 1
    for _ in range(length):
        kind = rng.integers(3)
        if kind == 0:
            seq.append(int(rng.integers(0, 100)))
        else:
            stamp = min(VOCAB - 1, stamp + int(rng.integers(0, 3)))
            seq.append(stamp)
    return seq


@pytest.mark.parametrize("timestamps", [False, True])
def test_processors_equal_transformers_on_random_scores_and_sequences(timestamps):
    rng = np.random.default_rng(0)
    for case in range(200):
        begin = 3
        batch = [random_sequence(rng, begin, int(rng.integers(0, 6))) for _ in range(1)]
        ids = np.array(batch)
        scores = (rng.standard_normal((1, VOCAB)) * 3).astype(np.float32)
        if case % 3 == 0:  # make timestamps likely, so the probability rule fires
            scores[:, NO_TIMESTAMPS + 1:] += 4
        expected = torch.from_numpy(scores.copy())
        for proc in hf_processors(begin, timestamps):
            expected = proc(torch.from_numpy(ids), expected)
        ours = RULES.process(scores, ids, begin, timestamps)
        np.testing.assert_array_equal(np.isneginf(ours), torch.isneginf(expected).numpy(), err_msg=str(batch))
        np.testing.assert_allclose(ours, expected.numpy(), rtol=0, atol=0)


# --- whole decodes: kiln's reference + kiln's rules vs transformers' generate ---

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper")
    hf = save_tiny_whisper(path)
    return hf, from_pretrained(path, task="automatic-speech-recognition")


def kiln_decode(model, feats, rules: WhisperDecoding, language=None, task=None, timestamps=False, prompt_ids=None,
                max_new_tokens=10):
    """What the runtime's decode loop will do over the artifact, here over the torch reference."""
    with torch.no_grad():
        audio = model.encode(feats)
        B = feats.shape[0]
        if language is None:
            start = torch.full((B, 1), rules.decoder_start_token_id)
            languages = rules.detect_language(model(decoder_input_ids=start, encoder_outputs=audio)["logits"][:, -1]
                                              .numpy())
        else:
            languages = [rules.language_id(language)] * B
        prompts = np.array([rules.prompt(int(lang), task, timestamps, prompt_ids) for lang in languages])
        begin, generated = prompts.shape[1], prompts
        config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=EOS)
        step = model(decoder_input_ids=torch.from_numpy(prompts), encoder_outputs=audio)
        done = np.zeros(B, dtype=bool)
        for new in range(max_new_tokens):
            scores = process_logits(step["logits"][:, -1].numpy(), generated, config, new_tokens=new,
                                    rules=lambda s: rules.process(s, generated, begin, timestamps))
            tokens = np.where(done, EOS, scores.argmax(-1))
            generated = np.concatenate([generated, tokens[:, None]], axis=1)
            done |= tokens == EOS
            if done.all():
                break
            step = model(decoder_input_ids=torch.from_numpy(tokens[:, None]), encoder_outputs=audio,
                         past_key_values=step["present_key_values"])
    return generated[:, :begin].tolist(), [until_eos(row) for row in generated[:, begin:].tolist()]


@pytest.mark.parametrize("options", [
    {},  # language detected per row
    {"language": "fr"},
    {"language": "german", "task": "translate"},
    {"task": "translate"},
    {"language": "es", "return_timestamps": True},
    {"return_timestamps": True},
])
def test_greedy_decode_equals_transformers_generate(tiny, options):
    hf, ours = tiny
    feats = features(3, seed=7)
    timestamps = options.get("return_timestamps", False)
    # One decode per 30 s window (force_unique_generate_call): transformers otherwise seeks on from the last
    # timestamp pair and decodes the window again, the long-form loop, which is the pipeline's business.
    expected = [until_eos(row) for row in hf.generate(feats, max_new_tokens=10, force_unique_generate_call=True,
                                                      **options).tolist()]
    prompts, got = kiln_decode(ours, feats, RULES, options.get("language"), options.get("task"), timestamps)
    assert [p + g for p, g in zip(prompts, got)] == expected  # the prompt (detected languages included) and tokens
    assert all(len(row) > 1 for row in got) and got != [got[0]] * len(got)  # something, and rows differ
    if timestamps:  # the first token is a timestamp within max_initial_timestamp_index (5)
        assert all(NO_TIMESTAMPS < row[0] <= NO_TIMESTAMPS + 6 for row in got), got
    if "language" not in options:  # detected per row: the rows need not agree
        assert all(prompt[1] in LANGS.values() for prompt in prompts), prompts


def test_a_text_prompt_goes_before_the_start_token(tiny):
    hf, ours = tiny
    feats, prompt = features(1, seed=5), [PREV, 11, 12, 13]
    expected = until_eos(hf.generate(feats, max_new_tokens=8, language="en", prompt_ids=torch.tensor(prompt),
                                     force_unique_generate_call=True).tolist()[0])
    prompts, got = kiln_decode(ours, feats, RULES, "en", prompt_ids=prompt, max_new_tokens=8)
    assert prompts == [prompt + [SOT, 102, TRANSCRIBE, NO_TIMESTAMPS]]
    assert prompts[0] + got[0] == expected
    assert expected[len(prompt):] != until_eos(hf.generate(feats, max_new_tokens=8, language="en",
                                             force_unique_generate_call=True).tolist()[0])  # the prompt mattered


def test_prompts_and_errors():
    assert RULES.prompt(103, "translate") == [SOT, 103, TRANSLATE, NO_TIMESTAMPS]
    assert RULES.prompt(103, None, timestamps=True) == [SOT, 103, TRANSCRIBE]
    assert RULES.prompt(102, prompt_ids=[11, 12]) == [PREV, 11, 12, SOT, 102, TRANSCRIBE, NO_TIMESTAMPS]
    assert [RULES.language_id(x) for x in ("fr", "<|fr|>", "French", "castilian")] == [103, 103, 103, 105]
    with pytest.raises(InputError, match="Unsupported language 'klingon'; this model knows de, en, es, fr"):
        RULES.language_id("klingon")
    with pytest.raises(InputError, match="'transcribe' or 'translate'"):
        RULES.prompt(102, "summarize")
    english = WhisperDecoding.from_dict({**GENERATION, "lang_to_id": {}, "task_to_id": {}})
    assert english.prompt(None, None) == [SOT, NO_TIMESTAMPS]
    with pytest.raises(InputError, match="English-only"):
        english.language_id("fr")
    with pytest.raises(InputError, match="no 'translate' task token"):
        english.prompt(None, "translate")
    with pytest.raises(ConfigError, match="must name Whisper's decoder_start_token_id and one eos_token_id"):
        WhisperDecoding.from_dict({"eos_token_id": EOS})
    with pytest.raises(ConfigError, match="'suppress_tokens' must be a list of token ids"):
        WhisperDecoding.from_dict({**GENERATION, "suppress_tokens": "1,2"})
    with pytest.raises(ConfigError, match="'alignment_heads' must be \\[layer, head\\] pairs"):
        WhisperDecoding.from_dict({**GENERATION, "alignment_heads": [[1]]})
    with pytest.raises(ConfigError, match="no 'no_timestamps_token_id'"):
        WhisperDecoding.from_dict({**GENERATION, "no_timestamps_token_id": None}).timestamp_begin


# --- long-form: a window's segments and where the next window starts; the tokens of many windows decoded back ---

BEGIN = NO_TIMESTAMPS + 1


def window_tokens(rng, length: int) -> list[int]:
    """What a window's decode can leave after its prompt: text and timestamps in the shapes the long-form loop
    tells apart (pairs, a lone timestamp at the end, none at all, a pair at 0.00), mostly rising, not always."""
    tokens, stamp = [], BEGIN + int(rng.integers(0, 3))
    for _ in range(length):
        kind = rng.integers(4)
        if kind == 0:
            tokens.append(int(rng.integers(0, EOS)))
        elif kind == 1 and rng.random() < 0.1:
            tokens.append(int(rng.integers(BEGIN, VOCAB)))  # out of order
        else:
            stamp = min(VOCAB - 1, stamp + int(rng.integers(0, 4)))
            tokens += [stamp] * int(rng.integers(1, 3))
    return tokens


def test_segments_and_the_next_window_as_transformers_long_form():
    from transformers.models.whisper.generation_whisper import WhisperGenerationMixin

    rng = np.random.default_rng(1)
    checked_moves = 0
    for case in range(400):
        tokens = window_tokens(rng, int(rng.integers(0, 14)))
        frames, seek = int(rng.choice([3000, 1234, 17])), int(rng.integers(0, 9000))
        offset = seek * 0.02 / 2
        theirs, move = WhisperGenerationMixin._retrieve_segment(
            seek_sequence=torch.tensor(tokens, dtype=torch.long), seek_outputs=[None],
            time_offset=torch.tensor([offset], dtype=torch.float64), timestamp_begin=BEGIN,
            seek_num_frames=torch.tensor([frames]), time_precision=0.02, time_precision_features=0.01, input_stride=2,
            prev_idx=0, idx=0, return_token_timestamps=False, decoder_input_ids=torch.zeros((1, 3)))
        ours, advance = split_segments(tokens, BEGIN, frames, time_offset=offset)
        assert [s["tokens"] for s in ours] == [s["tokens"].tolist() for s in theirs], tokens
        for a, b in zip(ours, theirs):
            assert a["start"] == pytest.approx(float(b["start"]), abs=1e-9), tokens
            assert a["end"] == pytest.approx(float(b["end"]), abs=1e-9), tokens
        move = int(move)
        if move > 0:  # transformers would decode a window that does not move forever; kiln moves a whole window
            assert advance == move, tokens
            checked_moves += 1
        else:
            assert advance == frames, tokens
    assert checked_moves > 300


def test_tokens_of_many_windows_decode_as_transformers_pipeline():
    """chunks_from_tokens against the decoding transformers' pipeline runs (its tokenizer's _decode_asr) on what a
    long-form transcription returns: each window's kept segments, one window after another."""
    from transformers.models.whisper.tokenization_whisper import _decode_asr

    hf_tokenizer = transformers.WhisperTokenizer(tokenizer_object=tiny_tokenizer())
    decode = tiny_tokenizer().decode
    rng = np.random.default_rng(2)
    windows_with_stamps = 0
    for case in range(300):
        tokens = []
        for _ in range(int(rng.integers(1, 5))):
            segments, _ = split_segments(window_tokens(rng, int(rng.integers(0, 12))), BEGIN, 3000)
            tokens += [t for segment in segments for t in segment["tokens"]]
        windows_with_stamps += any(t >= BEGIN for t in tokens)
        for timestamps in (True, False):
            text, extra = _decode_asr(hf_tokenizer, [{"tokens": torch.tensor([tokens])}], return_timestamps=timestamps,
                                      return_language=False, time_precision=0.02)
            chunks = chunks_from_tokens(tokens, decode, BEGIN, EOS)
            assert "".join(c["text"] for c in chunks) == text, tokens
            if timestamps:
                assert chunks == [{"timestamp": c["timestamp"], "text": c["text"]} for c in extra.get("chunks", [])], \
                    tokens
    assert windows_with_stamps > 200


def test_overlapping_chunks_merge_as_transformers_pipeline():
    """decode_asr over chunk_length_s's overlapping chunks (each its own window's tokens, with its stride) against
    transformers' _decode_asr: the times shifted per chunk, the timestamps in the overlaps skipped, the texts merged
    where they overlap."""
    from transformers.models.whisper.tokenization_whisper import _decode_asr, _find_longest_common_sequence

    hf_tokenizer = transformers.WhisperTokenizer(tokenizer_object=tiny_tokenizer())
    decode = tiny_tokenizer().decode
    rng = np.random.default_rng(3)
    for case in range(300):
        shared = [int(t) for t in rng.integers(0, EOS, 6)]
        outputs = []
        n = int(rng.integers(1, 5))
        for k in range(n):
            tokens = window_tokens(rng, int(rng.integers(0, 10)))
            if rng.random() < 0.7 and tokens:  # chunks that overlap say some of the same words
                cut = int(rng.integers(0, len(tokens) + 1))
                tokens = tokens[:cut] + shared[:int(rng.integers(2, 7))] + tokens[cut:]
            if rng.random() < 0.5:
                tokens = [t for t in tokens if t < BEGIN]  # decoded without timestamps
            left = 0.0 if k == 0 else float(rng.choice([0.2, 0.5, 5.0]))
            right = 0.0 if k == n - 1 else float(rng.choice([0.2, 0.5, 5.0]))
            outputs.append((tokens, (float(rng.choice([0.5, 30.0])), left, right)))
        theirs = [{"tokens": torch.tensor([t]), "stride": stride} for t, stride in outputs]
        for timestamps in (True, False):
            text, extra = _decode_asr(hf_tokenizer, theirs, return_timestamps=timestamps, return_language=False,
                                      time_precision=0.02)
            chunks = decode_asr(outputs, decode, BEGIN, EOS)
            assert "".join(c["text"] for c in chunks) == text, outputs
            if timestamps:
                assert chunks == [{"timestamp": c["timestamp"], "text": c["text"]} for c in extra.get("chunks", [])], \
                    outputs
        sequences = [t for t, _ in outputs if t]
        if sequences:
            assert longest_common_sequence(sequences) == _find_longest_common_sequence(sequences)


def test_token_timestamps_as_transformers():
    """The median filter, dynamic time warping and token times from alignment-head cross-attention against
    transformers' _median_filter, _dynamic_time_warping and _extract_token_timestamps (as generate calls it: the rows
    step by step, the prompt's dropped, cut to num_frames // 2)."""
    from types import SimpleNamespace

    from transformers.models.whisper.generation_whisper import _dynamic_time_warping, _median_filter

    rng = np.random.default_rng(0)
    for width in (1, 3, 7):
        x = rng.standard_normal((2, 3, 5, int(rng.integers(2, 40)))).astype(np.float32)
        np.testing.assert_array_equal(median_filter(x, width), _median_filter(torch.from_numpy(x), width).numpy())
    for shape in [(1, 1), (1, 9), (9, 1), (7, 30), (40, 25), (12, 200)]:
        matrix = rng.standard_normal(shape)
        if rng.random() < 0.5:
            matrix = np.round(matrix, 1)  # ties
        for got, want in zip(dynamic_time_warping(matrix), _dynamic_time_warping(matrix)):
            np.testing.assert_array_equal(got, want)

    class Outputs(dict):  # what _extract_token_timestamps reads of generate's output
        __getattr__ = dict.__getitem__

    heads, layers, H, E = [[1, 0], [0, 2], [1, 3]], 2, 4, 1500
    me = SimpleNamespace(config=SimpleNamespace(decoder_layers=layers, median_filter_width=7))
    hf_extract = transformers.WhisperForConditionalGeneration._extract_token_timestamps
    for prompt, new, frames in [(3, 12, 1100), (4, 2, 3000), (1, 30, 480), (3, 1, 900)]:
        rows = prompt + new - 1  # the last generated token is not fed
        logits = rng.standard_normal((layers, 1, H, rows, E)).astype(np.float32) * 3
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        steps = [tuple(torch.from_numpy(probs[layer][..., :prompt, :]) for layer in range(layers))]
        steps += [tuple(torch.from_numpy(probs[layer][..., r:r + 1, :]) for layer in range(layers))
                  for r in range(prompt, rows)]
        outputs = Outputs(cross_attentions=steps, sequences=torch.zeros(1, prompt + new, dtype=torch.long))
        want = hf_extract(me, outputs, heads, num_frames=torch.tensor([frames]), num_input_ids=prompt)[0].numpy()
        weights = np.stack([probs[layer, 0, head] for layer, head in heads])
        got = token_timestamps(weights, prompt, frames)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_word_chunks_as_transformers_pipeline():
    """decode_asr with each token's time against transformers' _decode_asr(return_timestamps="word"): the words of
    every segment (pieces joined up to punctuation, punctuation merged into its neighbours), each from the end of the
    token before its first to the end of its last, over overlapping chunks too."""
    from transformers.models.whisper.tokenization_whisper import _decode_asr

    hf_tokenizer = transformers.WhisperTokenizer(tokenizer_object=tiny_tokenizer())
    decode = tiny_tokenizer().decode
    punctuation = [tiny_tokenizer().token_to_id(c) for c in ".,\"'(!?-"]
    rng = np.random.default_rng(5)
    for case in range(200):
        outputs, n = [], int(rng.integers(1, 4))
        for k in range(n):
            tokens = window_tokens(rng, int(rng.integers(0, 10)))
            tokens = [int(rng.choice(punctuation)) if t < BEGIN and rng.random() < 0.3 else t for t in tokens]
            times = np.cumsum(rng.random(len(tokens)) * 0.4).round(2).tolist()
            stride = None if n == 1 else (30.0, 0.0 if k == 0 else 2.0, 0.0 if k == n - 1 else 2.0)
            outputs.append((tokens, stride, times))
        theirs = [{"tokens": torch.tensor([t]), "token_timestamps": torch.tensor([times]),
                   **({"stride": stride} if stride else {})} for t, stride, times in outputs]
        text, extra = _decode_asr(hf_tokenizer, theirs, return_timestamps="word", return_language=False,
                                  time_precision=0.02)
        chunks = decode_asr(outputs, decode, BEGIN, EOS)
        assert "".join(c["text"] for c in chunks) == text, outputs
        words = [word for chunk in chunks for word in chunk["words"]]
        assert [(w["text"], tuple(w["timestamp"])) for w in words] == [
            (w["text"], tuple(w["timestamp"])) for w in extra.get("chunks", [])], outputs


def test_words_of_unspaced_languages_are_their_characters():
    decode = tiny_tokenizer().decode
    ids = [tiny_tokenizer().token_to_id(c) for c in "ab,c"]
    times = [(0.0, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4)]
    assert [w["text"] for w in words_from_tokens(ids, times, decode)] == ["ab", ",c"]  # as transformers
    assert [w["text"] for w in words_from_tokens(ids, times, decode, "japanese")] == ["a", "b,", "c"]
