"""A fast tokenizer (``tokenizer.json``) for checkpoints that ship only a SentencePiece model.

DeBERTa-v3 ships ``spm.model``, SigLIP and T5 ``spiece.model``, XLM-R ``sentencepiece.bpe.model``, Llama 2
``tokenizer.model``, often without a ``tokenizer.json``. kiln's runtime tokenizes with Hugging Face ``tokenizers``
only, so the export converts the model once with transformers' converters (the ones ``AutoTokenizer`` runs, which
need the ``sentencepiece`` package), writing the artifact's ``tokenizer.json``; the runtime never sees the
SentencePiece file's format.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path

from kiln.errors import CheckpointError, InputError

log = logging.getLogger("kiln")
MODEL_FILES = ("spm.model", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


def sentencepiece_model(directory: Path) -> Path | None:
    return next((Path(directory, n) for n in MODEL_FILES if Path(directory, n).is_file()), None)


def convert(checkpoint_dir: Path, target: Path) -> str:
    """Write ``target/tokenizer.json`` converted from the checkpoint's SentencePiece model; returns its name."""
    model = sentencepiece_model(checkpoint_dir)
    missing = [m for m in ("sentencepiece", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"The checkpoint's tokenizer is a SentencePiece model ({model.name}) without a "
                         f"tokenizer.json; converting it needs {' and '.join(missing)}: pip install "
                         "'kiln[sentencepiece]'. Or save the fast tokenizer into the checkpoint "
                         "(AutoTokenizer.from_pretrained(...).save_pretrained(...)) and re-export.")
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint_dir))
    except Exception as err:  # noqa: BLE001 - any failure of the converter: say which file and why
        raise CheckpointError(f"Could not convert {model} into a fast tokenizer: {type(err).__name__}: {err}") from err
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a SentencePiece-only tokenizer class (transformers 5: SigLIP's): convert it explicitly
        backend = _convert_slow(tokenizer, model)
    if backend.get_vocab_size() < 2:
        raise CheckpointError(f"transformers read {model} as {type(tokenizer).__name__} with no vocabulary; "
                              "kiln's runtime needs a tokenizer.json.")
    with tempfile.TemporaryDirectory(prefix="kiln-spm-") as tmp:
        backend.save(str(Path(tmp) / "tokenizer.json"))
        Path(tmp, "tokenizer.json").replace(target / "tokenizer.json")
    log.info("Converted %s into tokenizer.json (%d tokens).", model.name, backend.get_vocab_size())
    return "tokenizer.json"


def _convert_slow(tokenizer, model: Path):
    """A ``tokenizers.Tokenizer`` for a tokenizer transformers keeps on SentencePiece: its own converter where it
    has one; SigLIP's (which has none) as T5's unigram model plus what ``SiglipTokenizer`` does before
    SentencePiece sees the text (lower-case, ASCII punctuation removed, whitespace collapsed and stripped) and the
    ``</s>`` it appends. Checked against ``SiglipTokenizer`` itself in the tests."""
    import string

    from tokenizers import Regex, normalizers, processors
    from transformers.convert_slow_tokenizer import SLOW_TO_FAST_CONVERTERS, SpmConverter, convert_slow_tokenizer

    name = type(tokenizer).__name__
    if name in SLOW_TO_FAST_CONVERTERS:
        return convert_slow_tokenizer(tokenizer)
    if name != "SiglipTokenizer":
        raise CheckpointError(f"transformers reads {model} as {name}, which it cannot convert to a fast tokenizer; "
                              "kiln's runtime needs a tokenizer.json. Save one into the checkpoint and re-export.")

    class SiglipConverter(SpmConverter):
        def post_processor(self):
            eos = self.original_tokenizer.eos_token
            return processors.TemplateProcessing(single=["$A", eos], pair=["$A", eos, "$B", eos],
                                                 special_tokens=[(eos, self.original_tokenizer.eos_token_id)])

    fast = SiglipConverter(tokenizer).converted()
    punctuation = Regex("[" + "".join("\\" + c for c in string.punctuation) + "]")
    canonical = [normalizers.Replace(punctuation, ""), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    if getattr(tokenizer, "do_lower_case", True):
        canonical.insert(0, normalizers.Lowercase())
    fast.normalizer = normalizers.Sequence([*canonical, *([fast.normalizer] if fast.normalizer else [])])
    return fast
