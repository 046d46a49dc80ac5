"""Hostile and broken files, fuzzed with hypothesis (issue 8, item 3): audio: wav, flac, ogg and mp3 files and bytes
(kiln.runtime.audio.load_audio), and Whisper's preprocessor_config.json.

Each case writes a damaged or adversarial file (truncated, bit-flipped, a header field claiming a huge size or an
odd rate, a JSON value of the wrong type or size) and runs the loader in a forked child under an address-space cap
and a time limit (``isolation.py``): the case passes when the loader succeeds or raises one of kiln's own errors (a
KilnError subclass); another exception, a crash, a hang or an allocation beyond the cap fails it. Cases are
derandomized (the same on every run, so CI is repeatable) and counted per loader; the counts are printed and recorded
as junit properties. ``KILN_FUZZ_EXAMPLES=N`` multiplies the cases for a long run.
"""

from __future__ import annotations

import io
import math
import struct

import numpy as np
import pytest
import soundfile  # imported here (soxr too), so the fork server loads them once for every child
import soxr  # noqa: F401
from hypothesis import given
from hypothesis import strategies as st

from kiln.runtime.audio import WhisperFeatureExtractor, load_audio

from fuzzing import TALLY, HUGE, JSON_FOUND, Blob, apply_edits, byte_edits, found, fuzz, json_file, scratch
from fuzzing import report  # noqa: F401  (a fixture the tests request by name)
from test_fuzz_configs import ABSURD

EXTRACTOR = WhisperFeatureExtractor({})
CLIP = (0.3 * np.sin(np.arange(800) * 0.05)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ audio files
def _decode(source):
    """load_audio on a path or bytes, then the features of what it returned: a decoded clip must be usable."""
    samples = load_audio(source)
    assert samples.dtype == np.float32 and samples.ndim == 1 and len(samples) and np.isfinite(samples).all()
    EXTRACTOR([samples[:48_000]], padding="longest")


def audio_bytes(fmt: str, subtype: str) -> bytes:
    """0.1 s of stereo at 22.05 kHz, so that a valid file is downmixed and resampled too."""
    t = np.arange(2205) / 22050
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 660 * t)], axis=1).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, stereo, 22050, format=fmt, subtype=subtype)
    return buffer.getvalue()


# Header fields worth hitting: RIFF and data sizes, channels, rate, byte rate, bits; FLAC's STREAMINFO (block and
# frame sizes, rate/channels/bits/total samples packed in bytes 18-25).
FORMATS = {"wav": ("WAV", "PCM_16", [4, 16, 20, 22, 24, 28, 32, 34, 40], 80),
           "flac": ("FLAC", "PCM_16", [4, 8, 10, 12, 15, 18, 20, 21, 22], 80),
           "ogg": ("OGG", "VORBIS", None, 40),
           "mp3": ("MP3", "MPEG_LAYER_III", None, 40)}
# Not audio at all, or a magic number and nothing after it.
NOT_AUDIO = [b"", b"\x00", b"RIFF", b"RIFF\xff\xff\xff\xffWAVE", b"fLaC", b"OggS", b"ID3\x04", b"\xff\xfb",
             bytes(range(256)), b"{}"]


@pytest.mark.parametrize("suffix", sorted(FORMATS))
def test_audio_file(suffix, tmp_path, report):
    fmt, subtype, hot, examples = FORMATS[suffix]
    valid = audio_bytes(fmt, subtype)

    @fuzz(examples)
    @given(data=st.builds(apply_edits, st.just(valid), byte_edits(len(valid), hot=hot)).map(Blob))
    def case(data):
        if len(data) % 2:  # half the cases as bytes, half as a file named like the format
            TALLY.check(f"audio ({suffix})", _decode, bytes(data), case=repr(data))
        else:
            path = scratch(tmp_path) / f"clip.{suffix}"
            path.write_bytes(data)
            TALLY.check(f"audio ({suffix})", _decode, path, case=repr(data))

    found(case, NOT_AUDIO + [valid])()
    report(f"audio ({suffix})")


def test_audio_size_claims_are_not_trusted(tmp_path):
    """Headers claiming 2^32 frames (WAV) or 2^36 samples (FLAC: 512 GiB as float32) in files of a few kB: decoded in
    blocks, so what the header claims is never allocated; under a 256 MiB cap."""
    wav = bytearray(audio_bytes("WAV", "PCM_16"))
    wav[40:44] = struct.pack("<I", 2**32 - 1)  # the data chunk's size
    flac = bytearray(audio_bytes("FLAC", "PCM_16"))
    # STREAMINFO bytes 18-25: 20 bits rate, 3 bits channels - 1, 5 bits bits - 1, 36 bits total samples
    packed = (22050 << 44) | (1 << 41) | (15 << 36) | (2**36 - 1)
    flac[18:26] = packed.to_bytes(8, "big")
    for name, data in (("claim.wav", wav), ("claim.flac", flac)):
        path = tmp_path / name
        path.write_bytes(bytes(data))
        outcome, detail = TALLY.check("audio-size-claim", _decode, path, case=name, headroom=256 << 20)
        assert outcome in ("ok", "kiln"), detail  # libsndfile may stop at the missing data: a kiln error then


# ---------------------------------------------------------------------------- preprocessor_config.json (Whisper)
def _load_feature_extractor(directory):
    fe = WhisperFeatureExtractor.from_dir(directory)
    out = fe([CLIP, CLIP[:500]], padding="longest", return_attention_mask=True)  # the short clip gets padding_value
    assert np.isfinite(out["input_features"]).all(), "a config that loads must give finite features"
    if fe.n_samples <= 48_000 and fe.nb_max_frames * fe.feature_size <= 3000 * 128:  # chunks unlike Whisper's 30 s
        assert np.isfinite(fe([CLIP])["input_features"]).all()


def test_whisper_preprocessor_config(tmp_path, report):
    base = {"chunk_length": 30, "dither": 0.0, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 80,
            "hop_length": 160, "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right",
            "padding_value": 0.0, "processor_class": "WhisperProcessor", "return_attention_mask": False,
            "sampling_rate": 16000}
    bank = np.random.default_rng(0).uniform(0, 0.02, (80, 201)).round(4)
    tables = [bank.tolist(), bank.T.tolist(), bank[:, :200].tolist(), [[]], [[0.1, 0.2], [0.3]], "slaney", [1, 2],
              *([[v] * 201] * 80 for v in (math.nan, 1e308, -0.1, "x", None))]
    targeted = {key: ABSURD + [2, 160, 400, 401, 8000, 44100, 2**14, *HUGE] for key in
                ("chunk_length", "feature_size", "hop_length", "n_fft", "sampling_rate")}
    targeted.update({"dither": ABSURD + [1e-4, 1.0], "padding_value": ABSURD + [1.0, -1.0],
                     "return_attention_mask": ABSURD, "padding_side": ABSURD + ["left"],
                     "feature_extractor_type": ABSURD + ["ViTImageProcessor"], "mel_filters": ABSURD + tables})

    @fuzz(120)
    @given(data=json_file(base, targeted))
    def case(data):
        directory = scratch(tmp_path)
        (directory / "preprocessor_config.json").write_bytes(data)
        TALLY.check("preprocessor_config.json (whisper)", _load_feature_extractor, directory, case=repr(data))

    changes = [{"feature_size": 2**20}, {"n_fft": 2**40}, {"hop_length": 1}, {"chunk_length": 2**40},
               {"sampling_rate": 1}, {"n_fft": 2}, {"mel_filters": [[1e308] * 201] * 80}, {"dither": 1e308}]
    found(case, JSON_FOUND, config=(base, changes))()
    report("preprocessor_config.json (whisper)")
