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
    if backend is None or backend.get_vocab_size() < 2:
        raise CheckpointError(f"transformers read {model} as {type(tokenizer).__name__}, which has no fast "
                              "tokenizer to save; kiln's runtime needs a tokenizer.json.")
    with tempfile.TemporaryDirectory(prefix="kiln-spm-") as tmp:
        backend.save(str(Path(tmp) / "tokenizer.json"))
        Path(tmp, "tokenizer.json").replace(target / "tokenizer.json")
    log.info("Converted %s into tokenizer.json (%d tokens).", model.name, backend.get_vocab_size())
    return "tokenizer.json"
