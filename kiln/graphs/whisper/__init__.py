"""Whisper (model_type "whisper"): openai/whisper-* of every size (80 or 128 mel bins), the English-only ".en"
models, distil-whisper (fewer decoder than encoder layers) and checkpoints fine-tuned from them."""

from __future__ import annotations

from kiln.graphs.registry import Architecture
from kiln.graphs.whisper import weights
from kiln.graphs.whisper.config import VARIANTS, WhisperConfig

ARCHITECTURE = Architecture(
    family="whisper",
    config=WhisperConfig,
    weights=weights,
    variants=VARIANTS,
    tasks={"automatic-speech-recognition": ("WhisperForConditionalGeneration", "ForConditionalGeneration")},
    spec="speech-seq2seq",
    description="speech recognition and translation",
)
