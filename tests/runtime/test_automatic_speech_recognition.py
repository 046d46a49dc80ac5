"""The automatic-speech-recognition pipeline over a tiny random multilingual Whisper artifact: language detection,
a forced language and task, timestamps and prompts reach the decoder as transformers' generate takes them, and the
segments are cut at the timestamp tokens. (Real weights and real speech, against transformers' pipeline:
tests/test_whisper_real.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from kiln.errors import InputError

transformers = pytest.importorskip("transformers")
pytest.importorskip("soundfile")

from whisper_tiny import EOS, NO_TIMESTAMPS, PREV, save_tiny_whisper, tiny_tokenizer, until_eos  # noqa: E402

TASK = "automatic-speech-recognition"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("asr")
    hf = save_tiny_whisper(root / "ckpt", preprocessing=True)
    kiln.export(root / "ckpt", root / "out", task=TASK)
    return hf, kiln.pipeline(TASK, root / "out", num_beams=1), transformers.WhisperFeatureExtractor(feature_size=80)


def audio(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def expected(hf, extractor, clip, **options) -> list[int]:
    feats = extractor(clip, sampling_rate=16000, return_tensors="pt").input_features
    prompt = options.pop("prompt_ids", None)
    if prompt is not None:
        options["prompt_ids"] = torch.tensor(prompt)
    row = hf.generate(feats, max_new_tokens=12, force_unique_generate_call=True, **options)[0].tolist()
    return until_eos(row[row.index(101):])[4 if not options.get("return_timestamps") else 3:]


@pytest.mark.parametrize("options", [{}, {"language": "de"}, {"language": "french", "task": "translate"},
                                     {"task": "translate"}])
def test_language_and_task_reach_the_decoder(tiny, options):
    hf, asr, extractor = tiny
    clip = audio(3.0, seed=1)
    tokens = expected(hf, extractor, clip, **options)
    assert asr(clip, generate_kwargs=dict(options), max_new_tokens=12)["text"] == tiny_tokenizer().decode(tokens)
    assert asr(clip, max_new_tokens=12, **options) == asr(clip, generate_kwargs=dict(options), max_new_tokens=12)


def test_timestamps_cut_segments(tiny):
    """With timestamps transformers' generate moves on from the last closed segment within the 30 s as well (its
    pipeline does not force one decode): kiln's tokens are generate's, cut into chunks as its pipeline cuts them."""
    from transformers.models.whisper.tokenization_whisper import _decode_asr

    hf, asr, extractor = tiny
    clip = audio(2.0, seed=2)
    feats = extractor(clip, sampling_rate=16000, return_tensors="pt").input_features
    tokens = until_eos(hf.generate(feats, max_new_tokens=12, return_timestamps=True)[0].tolist())
    out = asr(clip, return_timestamps=True, max_new_tokens=12)
    begin = NO_TIMESTAMPS + 1
    assert [t for t in tokens if t >= begin] and tokens[0] >= begin  # the random model does write timestamps
    assert out["text"] == tiny_tokenizer().decode([t for t in tokens if t < EOS])
    _, theirs = _decode_asr(transformers.WhisperTokenizer(tokenizer_object=tiny_tokenizer()),
                            [{"tokens": torch.tensor([tokens])}], return_timestamps=True, return_language=False,
                            time_precision=0.02)
    assert out["chunks"] == [{"timestamp": c["timestamp"], "text": c["text"]} for c in theirs["chunks"]]


def test_a_prompt_conditions_the_text(tiny):
    hf, asr, extractor = tiny
    clip, prompt = audio(3.0, seed=3), [PREV, 11, 12, 13]
    got = asr(clip, language="en", prompt_ids=prompt, max_new_tokens=12)["text"]
    assert got == tiny_tokenizer().decode(expected(hf, extractor, clip, language="en", prompt_ids=prompt))
    assert got != asr(clip, language="en", max_new_tokens=12)["text"]


@pytest.mark.parametrize("options", [{}, {"language": "fr", "prompt_ids": [PREV, 11, 12]}])
def test_long_audio_goes_window_after_window_as_transformers(tiny, options):
    """35 s: transformers' generate goes long-form (windows moved by the timestamps); kiln's pipeline does the same
    windows with the same tokens, the language detected on the first window, a prompt before every window."""
    hf, asr, extractor = tiny
    clip = audio(35.0, seed=5)
    feats = extractor(clip, sampling_rate=16000, return_tensors="pt", padding="longest", truncation=False)
    theirs = dict(options)
    if "prompt_ids" in theirs:
        theirs["prompt_ids"] = torch.tensor(theirs["prompt_ids"])
    expected = until_eos(hf.generate(feats.input_features, return_timestamps=True, max_new_tokens=12,
                                     **theirs)[0].tolist())
    ours = asr.feature_extractor([clip], padding="longest", truncation=False)["input_features"][0]
    segments = list(asr.segments(ours, language=options.get("language"), prompt_ids=options.get("prompt_ids"),
                                 generation={"max_new_tokens": 12, "num_beams": 1}))
    assert [t for segment in segments for t in segment["tokens"]] == expected
    starts = [segment["start"] for segment in segments]
    assert len(segments) > 10 and starts == sorted(starts) and starts[-1] > 1  # the random model moves in small steps
    out = asr(clip, return_timestamps=True, max_new_tokens=12, **options)
    assert out["text"] == tiny_tokenizer().decode([t for t in expected if t < EOS])
    from transformers.models.whisper.tokenization_whisper import _decode_asr  # what transformers' pipeline runs

    _, theirs = _decode_asr(transformers.WhisperTokenizer(tokenizer_object=tiny_tokenizer()),
                            [{"tokens": torch.tensor([expected])}], return_timestamps=True, return_language=False,
                            time_precision=0.02)
    assert out["chunks"] == [{"timestamp": c["timestamp"], "text": c["text"]} for c in theirs["chunks"]]


def test_option_errors(tiny):
    _, asr, _ = tiny
    clip = audio(1.0, seed=4)
    with pytest.raises(InputError, match="Unsupported language 'klingon'"):
        asr(clip, language="klingon")
    with pytest.raises(InputError, match="task must be 'transcribe' or 'translate'"):
        asr(clip, task="summarize")
    with pytest.raises(InputError, match="language given twice"):
        asr(clip, language="de", generate_kwargs={"language": "fr"})
    with pytest.raises(InputError, match="prompt_ids must be a non-empty 1-D list"):
        asr(clip, prompt_ids=[[1, 2]])
    with pytest.raises(InputError, match="exceed the decoder's 40 positions"):
        asr(clip, max_new_tokens=39)
    with pytest.raises(InputError, match="empty list of audio inputs"):
        asr([])
    with pytest.raises(InputError, match="chunk_length_s must be a number of seconds in \\(0, 30\\]"):
        asr(clip, chunk_length_s=45)
    with pytest.raises(InputError, match="must be longer than the strides on both sides"):
        asr(clip, chunk_length_s=4, stride_length_s=2)
    with pytest.raises(InputError, match="stride_length_s goes with chunk_length_s"):
        asr(clip, stride_length_s=2)
    with pytest.raises(InputError, match="stream\\(\\) takes no chunk_length_s"):
        list(asr.stream(clip, chunk_length_s=10))


@pytest.mark.parametrize("options", [{"max_new_tokens": 30}, {"max_new_tokens": 8}, {"max_new_tokens": 30, "num_beams": 3}])
def test_word_timestamps_as_transformers_pipeline(tiny, options):
    """return_timestamps="word": the alignment heads' cross-attention (the decoder graph's alignment_weights), dynamic
    time warping and the words put together as transformers' pipeline does, on the same random weights; also when
    max_new_tokens cuts the window (no end-of-text: the last token is not fed) and with beam search."""
    hf, asr, extractor = tiny
    theirs = transformers.pipeline(TASK, model=hf, feature_extractor=extractor, device="cpu",
                                   tokenizer=transformers.WhisperTokenizer(tokenizer_object=tiny_tokenizer()))
    # (seed 5: on seed 4 the beams write <|startoflm|>, which transformers' pipeline prints as text here because
    # the tiny tokenizer made for it does not list it among its special ids; real Whisper tokenizers do)
    clip = audio(4.0, seed=5)
    expected = theirs(clip.copy(), return_timestamps="word", generate_kwargs={"num_beams": 1, **options})
    got = asr(clip, return_timestamps="word", generate_kwargs=dict(options))
    assert got == expected
    assert got["chunks"] and "".join(w["text"] for w in got["chunks"]) == got["text"]
    assert all(w["timestamp"][0] <= w["timestamp"][1] for w in got["chunks"])
