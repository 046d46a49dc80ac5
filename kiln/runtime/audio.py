"""Audio -> Whisper's ``input_features``, as transformers computes them, with soundfile, soxr and numpy.

``load_audio`` takes what ``transformers.pipeline("automatic-speech-recognition")`` takes and returns mono float32
samples at the model's rate:
- a path (str or os.PathLike) or the bytes of a wav/flac/ogg/mp3 file: decoded with soundfile (libsndfile), channels
  averaged, resampled with soxr at "HQ". That is transformers' ``audio_utils.load_audio(..., backend="soundfile")``
  and ``librosa.load`` step for step, output length included. transformers' pipeline itself decodes paths and bytes
  with the ffmpeg command line, which resamples with its own filter, so its samples differ slightly from these;
- a 1-D float numpy array, taken to be at the model's rate already;
- a dict ``{"raw": array, "sampling_rate": N}`` or ``{"array": array, "sampling_rate": N}`` (the key ``datasets``
  uses); another rate is resampled with soxr (transformers' pipeline uses torchaudio's sinc resampler there). Unlike
  the pipeline, which averages a (channels, samples) array itself, kiln asks for a 1-D array: the shape alone cannot
  tell two channels from two samples, and soundfile returns (samples, channels).
Integer arrays are refused rather than read as floats, as transformers does: int16 PCM read as 32767.0 would feed
Whisper a clip 90 dB too loud.

``WhisperFeatureExtractor`` reads ``preprocessor_config.json`` as transformers' class does and computes its numpy
path, ``_np_extract_fbank_features``: a periodic Hann window, a centred STFT with reflect padding, the power
spectrum, the Slaney mel bank (0-8000 Hz), the last frame dropped, log10 clamped at 1e-10, a floor 8 below each
clip's maximum, then (x + 4) / 4. transformers' ``__call__`` uses its torch path instead whenever torch is installed:
``torch.stft`` in float32 over the whole batch, the same formula (its maximum is also per clip). kiln computes in
float64 and rounds once: on real speech it is within 2e-7 of the numpy path and 2e-5 of the torch path.
Where kiln differs on purpose:
- ``mel_filters`` saved in the file (older checkpoints carry a (mels, bins) table) are used as given; transformers
  recomputes the bank and ignores them;
- ``dither`` is implemented, seeded: noise of that standard deviation is added to each padded clip before the STFT,
  as transformers' torch path does, but drawn from ``default_rng(0)``, so a clip gives the same features on every
  call (transformers' noise is unseeded);
- ``attention_mask`` has one value per feature frame; transformers returns one per sample when the mask is asked
  for by the file's ``return_attention_mask`` alone rather than by the call.
"""

from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path

import numpy as np

from kiln.errors import ArtifactError, InputError, require
from kiln.files import read_json

log = logging.getLogger("kiln")
FILE = "preprocessor_config.json"
EXTRA = "audio"
READ_BLOCK = 1 << 20  # samples decoded at a time, all channels together: a header's frame count is never trusted
MAX_SAMPLES = 1 << 31  # after resampling: 37 hours at 16 kHz; beyond it a dict's rate is surely wrong
STFT_BLOCK = 4096  # frames transformed at a time: bounds memory for hours of audio, costs nothing at 30 s
MAX_FFT = 1 << 14
MAX_MELS = 1024
MAX_RATE = 384_000  # the highest rate audio hardware records at
MAX_CHUNK = 600  # seconds; Whisper's is 30


def _soundfile():
    return require("soundfile", EXTRA, "Reading audio files")


def _soxr():
    return require("soxr", EXTRA, "Resampling audio")


# ---------------------------------------------------------------------------------------------------- loading
def load_audio(inputs, sampling_rate: int = 16000) -> np.ndarray:
    """One clip as transformers' speech recognition pipeline accepts it -> (N,) float32 at ``sampling_rate``."""
    rate = _rate(sampling_rate, "load_audio's sampling_rate")
    if isinstance(inputs, dict):
        return _from_dict(inputs, rate)
    if isinstance(inputs, np.ndarray):
        return _waveform(inputs, "The audio array")
    if isinstance(inputs, (str, os.PathLike)):
        samples, source_rate = _decode_file(inputs)
    elif isinstance(inputs, (bytes, bytearray, memoryview)):
        samples, source_rate = _decode(io.BytesIO(bytes(inputs)), "the audio bytes")
    else:
        hint = " Convert tensors with .numpy()." if hasattr(inputs, "numpy") else ""
        raise InputError(f"Audio must be a file path, the bytes of an audio file, a 1-D numpy array or a dict "
                         f"{{\"raw\": array, \"sampling_rate\": N}}, got {type(inputs).__name__}.{hint}")
    return _resample(samples, source_rate, rate)


def _from_dict(inputs: dict, rate: float) -> np.ndarray:
    raw = inputs.get("raw")
    array = raw if raw is not None else inputs.get("array")  # transformers reads "raw" first
    if array is None:
        if "path" in inputs or "bytes" in inputs:
            raise InputError("The audio dict names a file but holds no samples: pass the path (or the bytes) itself, "
                             "not in a dict; the file carries its own sampling rate.")
        raise InputError(f"An audio dict needs the samples under 'raw' (or 'array') and their rate under "
                         f"'sampling_rate', e.g. {{\"raw\": array, \"sampling_rate\": 16000}}; got keys "
                         f"{sorted(map(str, inputs))!r:.200}.")
    if isinstance(array, (str, os.PathLike, bytes, bytearray)):
        raise InputError("The audio dict gives a file together with a 'sampling_rate': a file carries its own rate. "
                         "Pass the path (or the bytes) alone; a dict is for samples already decoded.")
    if "sampling_rate" not in inputs:
        raise InputError("The audio dict has no 'sampling_rate': give the rate the samples were recorded at, e.g. "
                         "{\"raw\": array, \"sampling_rate\": 44100}.")
    source_rate = _rate(inputs["sampling_rate"], "The audio dict's 'sampling_rate'")
    return _resample(_waveform(array, "The audio dict's array"), source_rate, rate)


def _rate(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value <= 0:
        raise InputError(f"{what} must be a positive number of samples per second, got {value!r:.100}.")
    return value


def _waveform(array, what: str) -> np.ndarray:
    """A caller's samples -> (N,) float32, or an InputError that says how to fix them."""
    if not isinstance(array, np.ndarray):
        hint = " Convert tensors with .numpy()." if hasattr(array, "numpy") else \
            " Wrap a list with np.asarray(x, dtype=np.float32)." if isinstance(array, (list, tuple)) else ""
        raise InputError(f"{what} must be a numpy array, got {type(array).__name__}.{hint}")
    if array.dtype.kind in "iu":
        raise InputError(f"{what} holds integers ({array.dtype}); give float samples in [-1, 1], e.g. "
                         "x.astype(np.float32) / 32768 for 16-bit PCM.")
    if array.dtype.kind != "f":
        raise InputError(f"{what} must hold float samples, got dtype {array.dtype}.")
    if array.ndim != 1:
        hint = (" Downmix it first: x.mean(axis=1) for (samples, channels), as soundfile.read returns, or "
                "x.mean(axis=0) for (channels, samples)." if array.ndim == 2 else "")
        raise InputError(f"{what} must be 1-D (mono samples), got shape {array.shape}.{hint}")
    if array.size == 0:
        raise InputError(f"{what} is empty (0 samples).")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: caught next
        samples = np.ascontiguousarray(array, dtype=np.float32)  # soxr and the STFT's strided view need contiguous
    if not np.isfinite(samples).all():
        raise InputError(f"{what} holds NaN or infinite samples; a decoder or an earlier step went wrong.")
    return samples


def _decode_file(path) -> tuple[np.ndarray, int]:
    text = os.fsdecode(os.fspath(path))
    if text.startswith(("http://", "https://")):
        raise InputError(f"{text!r} is a URL; kiln does not download audio. Fetch it and pass the file or its bytes.")
    if not os.path.isfile(text):
        raise InputError(f"No audio file at {text!r}.")
    return _decode(text, repr(text))


def _decode(source, name: str) -> tuple[np.ndarray, int]:
    """A path or a file object -> ((N,) float32 averaged over channels, its sampling rate)."""
    sf = _soundfile()
    blocks = []
    try:
        with sf.SoundFile(source) as f:
            rate, channels = f.samplerate, f.channels
            step = max(1, READ_BLOCK // max(channels, 1))
            # In blocks until the data ends: one read() would allocate whatever frame count the header claims.
            while len(block := f.read(step, dtype="float32", always_2d=True)):  # (t, Ch)
                blocks.append(block.mean(axis=1, dtype=np.float32) if channels > 1 else block[:, 0])
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError, OSError, EOFError) as err:
        raise InputError(f"Cannot decode {name} as audio ({err}). Give a wav, flac, ogg or mp3 file that is "
                         "complete; other formats need converting first (e.g. ffmpeg -i in.m4a out.wav).") from None
    if rate <= 0:
        raise InputError(f"{name} declares a sampling rate of {rate}; the file is damaged.")
    samples = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return _waveform(samples, f"The audio decoded from {name}"), rate


def _resample(samples: np.ndarray, source_rate: float, rate: float) -> np.ndarray:
    if source_rate == rate:
        return samples
    length = math.ceil(len(samples) * rate / source_rate)
    if length > MAX_SAMPLES:
        raise InputError(f"Resampling {len(samples)} samples from {source_rate} Hz to {rate} Hz would make {length}; "
                         "check the sampling rate given with the samples.")
    soxr = _soxr()
    try:
        # "HQ" is soxr_hq, the quality of librosa.load and of transformers' soundfile loader, so kiln's samples equal
        # theirs; "VHQ" costs more for a passband Whisper never hears (its mel bank stops at 8 kHz).
        out = soxr.resample(samples, source_rate, rate, quality="HQ")
    except (ValueError, RuntimeError, MemoryError) as err:
        raise InputError(f"Cannot resample from {source_rate} Hz to {rate} Hz ({err}).") from None
    # soxr rounds the output length; librosa and transformers pad or cut it to ceil(N * rate / source_rate).
    out = np.pad(out, (0, max(0, length - len(out))))[:length]
    return np.ascontiguousarray(out, dtype=np.float32)


# --------------------------------------------------------------------------------------------------- features
def hertz_to_mel(hertz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, Whisper's): linear below 1 kHz, logarithmic above."""
    hertz = np.asarray(hertz, dtype=np.float64)
    linear = 3.0 * hertz / 200.0
    logarithmic = 15.0 + np.log(np.maximum(hertz, 1e-10) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(hertz >= 1000.0, logarithmic, linear)


def mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    linear = 200.0 * mels / 3.0
    logarithmic = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels - 15.0))
    return np.where(mels >= 15.0, logarithmic, linear)


def mel_filter_bank(num_frequency_bins: int, num_mel_filters: int, sampling_rate: int, min_frequency: float = 0.0,
                    max_frequency: float = 8000.0) -> np.ndarray:
    """(num_frequency_bins, num_mel_filters) float64 triangles on the Slaney scale with Slaney's area normalization:
    transformers' ``mel_filter_bank(..., norm="slaney", mel_scale="slaney")``, librosa's ``filters.mel`` transposed."""
    edges = mel_to_hertz(np.linspace(hertz_to_mel(min_frequency), hertz_to_mel(max_frequency), num_mel_filters + 2))
    bins = np.linspace(0, sampling_rate // 2, num_frequency_bins)  # integer Nyquist, as transformers
    slopes = edges[None, :] - bins[:, None]  # (F, M + 2)
    widths = np.diff(edges)  # (M + 1,)
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    bank = np.maximum(0.0, np.minimum(rising, falling))  # (F, M)
    return bank * (2.0 / (edges[2:] - edges[:-2]))  # each filter's area ~ constant energy per band


def hann_window(length: int) -> np.ndarray:
    """The periodic Hann window (torch.hann_window's default): the symmetric one of length + 1, last point dropped."""
    return np.hanning(length + 1)[:-1]


def _whole(config: dict, name: str, default: int, low: int, high: int) -> int:
    value = config.get(name, default)
    if type(value) is not int or not low <= value <= high:  # type(): JSON true is an int to isinstance
        raise ArtifactError(f"{FILE} '{name}' must be a whole number from {low} to {high}, got {value!r:.100}. "
                            "Fix the file or re-save the feature extractor.")
    return value


def _number(config: dict, name: str, default: float, low: float, high: float) -> float:
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:  # NaN fails too
        raise ArtifactError(f"{FILE} '{name}' must be a number from {low:g} to {high:g} (samples are in [-1, 1]), "
                            f"got {value!r:.100}.")
    return float(value)


class WhisperFeatureExtractor:
    """Callable on a list of clips (1-D float arrays at ``sampling_rate``); returns ``{"input_features": (B, M, T)}``.
    Immutable, so one instance serves many threads."""

    def __init__(self, config: dict):
        if not isinstance(config, dict):
            raise ArtifactError(f"{FILE} must hold a JSON object, got {type(config).__name__}.")
        kind = config.get("feature_extractor_type", "WhisperFeatureExtractor")
        if kind != "WhisperFeatureExtractor":
            raise ArtifactError(f"{FILE} describes a {kind!r:.100}, not a WhisperFeatureExtractor; kiln reads "
                                "Whisper's log-mel features only.")
        self.feature_size = _whole(config, "feature_size", 80, 1, MAX_MELS)
        self.sampling_rate = _whole(config, "sampling_rate", 16000, 1, MAX_RATE)
        self.n_fft = _whole(config, "n_fft", 400, 2, MAX_FFT)
        self.hop_length = _whole(config, "hop_length", 160, 1, MAX_FFT)
        self.chunk_length = _whole(config, "chunk_length", 30, 1, MAX_CHUNK)
        self.n_samples = self.chunk_length * self.sampling_rate
        self.nb_max_frames = self.n_samples // self.hop_length
        self.padding_value = _number(config, "padding_value", 0.0, -1.0, 1.0)  # silence, in Whisper: 0.0
        # transformers draws dither noise unseeded; kiln seeds it per clip, so one clip gives one answer anywhere.
        self.dither = _number(config, "dither", 0.0, 0.0, 1.0)
        self.return_attention_mask = config.get("return_attention_mask", False)
        if not isinstance(self.return_attention_mask, bool):
            raise ArtifactError(f"{FILE} 'return_attention_mask' must be true or false, got "
                                f"{self.return_attention_mask!r:.100}.")
        if config.get("padding_side", "right") != "right":
            raise ArtifactError(f"{FILE} 'padding_side' is {config['padding_side']!r:.100}; kiln pads audio on the "
                                "right only, as every Whisper checkpoint does.")
        bins = 1 + self.n_fft // 2
        given = config.get("mel_filters")
        self.mel_filters = self._given_filters(given, bins) if given is not None else mel_filter_bank(
            bins, self.feature_size, self.sampling_rate)  # (F, M)
        if (self.mel_filters.max(axis=0) <= 0).any():
            log.warning("%s: some of the %d mel filters are all zero (n_fft %d, sampling_rate %d); their features "
                        "stay at the floor, as in transformers.", FILE, self.feature_size, self.n_fft,
                        self.sampling_rate)
        self.window = hann_window(self.n_fft)

    def _given_filters(self, value, bins: int) -> np.ndarray:
        """A saved table -> (F, M). Old transformers saved (M, F), the layout its own matmul used; accept both."""
        try:
            table = np.asarray(value, dtype=np.float64)
        except (ValueError, TypeError, OverflowError):
            table = None
        expected = {(self.feature_size, bins), (bins, self.feature_size)}
        # Weights are triangles peaking at 1 at most (area-normalized ones far lower); larger ones overflow the power.
        if table is None or table.shape not in expected or not ((table >= 0) & (table <= 1)).all():
            raise ArtifactError(f"{FILE} 'mel_filters' must be a table of weights in [0, 1], {self.feature_size} rows "
                                f"(feature_size) of {bins} (1 + n_fft // 2), got "
                                f"{'shape ' + str(table.shape) if table is not None else repr(value)[:100]}. "
                                "Delete the key to have kiln compute the bank.")
        return table.T if table.shape == (self.feature_size, bins) else table

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "WhisperFeatureExtractor":
        file = Path(path) / FILE
        return cls(read_json(file, "Re-export the artifact.", missing=(
            f"{file} is missing: speech recognition needs the feature extractor settings. Save them into the "
            "checkpoint (WhisperFeatureExtractor.from_pretrained(...).save_pretrained(dir)) and re-export.")))

    def __call__(self, audios: list[np.ndarray], *, padding: str = "max_length", truncation: bool = True,
                 return_attention_mask: bool | None = None) -> dict[str, np.ndarray]:
        """Clips -> ``input_features`` float32 (B, feature_size, frames), plus ``attention_mask`` int64 (B, frames)
        (1 on frames that start inside the clip) when asked, or when the file asks and the call does not say.

        padding="max_length" pads every clip with ``padding_value`` to ``chunk_length`` seconds (3000 frames);
        padding="longest" pads to the longest clip. truncation cuts clips to ``chunk_length`` seconds first."""
        if isinstance(audios, np.ndarray) or not isinstance(audios, (list, tuple)) or not audios:
            raise InputError("The feature extractor takes a non-empty list of clips (1-D float arrays); wrap one clip "
                             "as [audio].")
        if not isinstance(padding, str) or padding not in ("max_length", "longest"):
            raise InputError(f"padding must be 'max_length' or 'longest', got {padding!r:.100}.")
        clips = [_waveform(audio, f"Clip {i}") for i, audio in enumerate(audios)]
        if truncation:
            clips = [clip[:self.n_samples] for clip in clips]
        longest = max(len(clip) for clip in clips)
        if padding == "longest":
            length = longest
        elif longest > self.n_samples:
            raise InputError(f"A clip has {longest} samples, more than chunk_length ({self.chunk_length} s = "
                             f"{self.n_samples} samples): pass truncation=True to cut it, or padding='longest' to "
                             "keep it whole.")
        else:
            length = self.n_samples
        frames = self._frames(length)
        if frames < 1:
            raise InputError(f"The clips are too short: {length} samples give no feature frame at hop_length "
                             f"{self.hop_length}; pad them or use padding='max_length'.")
        features = np.empty((len(clips), self.feature_size, frames), dtype=np.float32)  # (B, M, T)
        for i, clip in enumerate(clips):
            padded = np.full(length, self.padding_value, dtype=np.float64)
            padded[:len(clip)] = clip
            features[i] = self.log_mel(padded)
        out = {"input_features": features}
        if self.return_attention_mask if return_attention_mask is None else return_attention_mask:
            starts = np.arange(frames) * self.hop_length  # (T,) first sample of each frame
            lengths = np.array([len(clip) for clip in clips])[:, None]  # (B, 1)
            out["attention_mask"] = (starts[None, :] < lengths).astype(np.int64)  # (B, T)
        return out

    def _frames(self, length: int) -> int:
        """Feature frames of a padded clip: the centred STFT's 1 + (N + 2 * (n_fft // 2) - n_fft) // hop, less one."""
        return (length + 2 * (self.n_fft // 2) - self.n_fft) // self.hop_length

    def log_mel(self, waveform: np.ndarray) -> np.ndarray:
        """(N,) padded clip -> (M, T) float32 log-mel features; transformers' ``_np_extract_fbank_features``."""
        waveform = np.asarray(waveform, dtype=np.float64)
        if self.dither:
            waveform = waveform + self.dither * np.random.default_rng(0).standard_normal(len(waveform))
        half = self.n_fft // 2
        padded = np.pad(waveform, half, mode="reflect")  # centre frame t on sample t * hop
        windows = np.lib.stride_tricks.sliding_window_view(padded, self.n_fft)[::self.hop_length]  # (T + 1, n_fft)
        frames = self._frames(len(waveform))  # Whisper drops the STFT's last frame
        mel = np.empty((frames, self.feature_size), dtype=np.float64)  # (T, M)
        for start in range(0, frames, STFT_BLOCK):
            stop = min(start + STFT_BLOCK, frames)
            spectrum = np.fft.rfft(windows[start:stop] * self.window, axis=-1)  # (t, F) complex
            power = spectrum.real ** 2 + spectrum.imag ** 2
            mel[start:stop] = power @ self.mel_filters  # (t, F) @ (F, M) -> (t, M)
        log_spec = np.log10(np.maximum(mel.T, 1e-10))  # (M, T)
        log_spec = np.maximum(log_spec, log_spec.max() - 8.0)  # an 80 dB range below the clip's loudest bin
        return ((log_spec + 4.0) / 4.0).astype(np.float32)
