"""GGUF vocabularies -> a fast tokenizer (``tokenizer.json``) and ``tokenizer_config.json``: byte-level BPE as
llama.cpp stores it, Gemma's SentencePiece BPE as transformers' GemmaTokenizer is built, and the other SentencePiece
BPE vocabularies (Llama 2, Mistral, Phi-3) as its LlamaTokenizer is. Part of the GGUF
conversion (``kiln.hub.gguf.convert``); ``tokenizers`` is imported lazily.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from kiln.errors import CheckpointError
from kiln.hub.gguf import GEMMA, _get, _reader, _typed

log = logging.getLogger("kiln")


# Pre-tokenizer splits for byte-level vocabularies, by `tokenizer.ggml.pre` (llama.cpp's llama-vocab.cpp names).
# Copied from transformers.integrations.gguf.gguf_tokenizer_mapping (_LLAMA3_SPLIT, qwen2's PRETOKENIZE_REGEX).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
          "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_GPT2_PRE = (None, "default", "gpt2", "gpt-2")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def build_tokenizer(path: str | os.PathLike):
    """The fast tokenizer (``tokenizers.Tokenizer``) for a byte-level BPE vocabulary (``tokenizer.ggml.model`` gpt2)
    or a SentencePiece BPE one ('llama': Gemma's, Phi-3's, Llama 2's); None for other tokenizer models ('bert',
    unigram 't5', ...), which kiln does not rebuild yet."""
    from tokenizers import processors

    reader, path = _reader(path), Path(path)
    kind, arch = _get(reader, "tokenizer.ggml.model"), _get(reader, "general.architecture")
    if kind == "llama" and arch in GEMMA:
        tok, tokens = _gemma_tokenizer(reader, path)
    elif kind == "llama":
        tok, tokens = _sentencepiece_tokenizer(reader, path, prefix_by_normalizer=arch == "phi3")
    elif kind == "gpt2":
        tok, tokens = _byte_level_tokenizer(reader, path)
    else:
        log.warning("%s: kiln rebuilds byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2') and SentencePiece BPE "
                    "ones ('llama') from GGUF, not %r.", path.name, kind)
        return None
    added = {}  # role -> (token, id) that llama.cpp puts around every text (tokenizer.ggml.add_bos_token ...)
    for role in ("bos", "eos"):
        token_id = _typed(reader, path, f"tokenizer.ggml.{role}_token_id", "id")
        if _adds(reader, role) and token_id in range(len(tokens)):
            added[role] = (tokens[token_id], token_id)
    if added:
        single = [f"{added['bos'][0]}:0"] if "bos" in added else []
        single += ["$A:0"] + ([f"{added['eos'][0]}:0"] if "eos" in added else [])
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=list(added.values()))
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _adds(reader, role: str) -> bool:
    """Whether llama.cpp puts ``role`` (bos or eos) around every text: the file's flag, else its default (BOS for a
    SentencePiece vocabulary, as llama.cpp and transformers' GGUF loader do)."""
    default = role == "bos" and _get(reader, "tokenizer.ggml.model") == "llama"
    return bool(_get(reader, f"tokenizer.ggml.add_{role}_token", default))


def _tokens(reader, path: Path) -> list[str]:
    tokens = _typed(reader, path, "tokenizer.ggml.tokens", "texts")
    if not tokens:
        raise CheckpointError(f"{path.name} has no vocabulary (GGUF metadata 'tokenizer.ggml.tokens'). The file is "
                              "incomplete; convert the checkpoint again with llama.cpp's convert_hf_to_gguf.py.")
    return tokens


def _byte_level_tokenizer(reader, path: Path):
    """(tokenizer without post-processor, the vocabulary as the file spells it) for a byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = _typed(reader, path, "tokenizer.ggml.pre", "text")
    tokens = _tokens(reader, path)
    types = _typed(reader, path, "tokenizer.ggml.token_type", "ints", [])
    spelling = _bytes_to_unicode()
    alphabet = set(spelling)
    # llama.cpp stores byte-level tokens in GPT-2's byte alphabet already; respell any that are not (raw UTF-8 text).
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in _typed(reader, path, "tokenizer.ggml.merges", "texts", [])]
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    except Exception as err:  # tokenizers raises a bare Exception for merges it cannot use
        raise CheckpointError(f"{path.name}: the GGUF vocabulary and merges do not form a BPE tokenizer ({err}). The "
                              "file is corrupt: convert the checkpoint again.") from None
    if pre == "smollm":  # as SmolLM's own tokenizer.json: each digit alone, then GPT-2's split (llama.cpp: "\p{N}")
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in _GPT2_PRE:
            log.warning("%s: pre-tokenizer %r is unknown to kiln; splitting text as GPT-2 does, which may tokenize "
                        "some text differently from llama.cpp.", path.name, pre)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Whole-token matching for control tokens (<|im_start|>) and user-defined ones (<think>), as llama.cpp does;
    # a "control" token outside the byte alphabet is a llama.cpp mislabel and stays an ordinary vocabulary entry.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                            if ty == _CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    return tok, tokens


def _gemma_tokenizer(reader, path: Path):
    """(tokenizer without post-processor, the vocabulary as the file spells it) for Gemma's SentencePiece BPE, as
    transformers' GemmaTokenizer is built: spaces normalised to '▁', no pre-tokenizer, byte fallback, unknown
    pieces fused. The file lists no merges: they are recovered from the vocabulary, each token cut into two tokens,
    ordered by the position of the merged token in the file (Gemma's scores do not follow its merge order). Tokens
    of spaces only are stored as spaces, which the vocabulary spells with '▁' (as transformers' GGUF loader
    respells them)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    tokens = _tokens(reader, path)
    types = _typed(reader, path, "tokenizer.ggml.token_type", "ints", [])
    spelled = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}  # of two equal spellings the later id wins, as in transformers
    merges = _generate_merges(vocab, {t: -i for t, i in vocab.items()})  # position as the score
    unk = _special(reader, "unk") or "<unk>"
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk, byte_fallback=True))
    except Exception as err:  # tokenizers raises a bare Exception for a vocabulary it cannot use
        raise CheckpointError(f"{path.name}: the GGUF vocabulary does not form a BPE tokenizer ({err}). The file is "
                              "corrupt: convert the checkpoint again.") from None
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(spelled, types)
                            if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(spelled, types) if ty == _USER_DEFINED])
    return tok, spelled


def _sentencepiece_tokenizer(reader, path: Path, prefix_by_normalizer: bool):
    """(tokenizer without post-processor, the vocabulary) for a SentencePiece BPE vocabulary other than Gemma's
    (Llama 2, Mistral, Phi-3), as transformers builds it from a GGUF (its LlamaTokenizer): byte fallback, unknown
    pieces fused, merges from the file or recovered from the vocabulary by score, '▁' for spaces with one put before
    the text (a Metaspace pre-tokenizer, "first"; Phi-3: a normalizer that prepends it, so text that starts with a
    space gets one more, as Phi-3's own tokenizer.json), the decoder dropping that first space."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens = _tokens(reader, path)
    types = _typed(reader, path, "tokenizer.ggml.token_type", "ints", [])
    vocab = {t: i for i, t in enumerate(tokens)}
    listed = _typed(reader, path, "tokenizer.ggml.merges", "texts", None)
    if listed is not None:
        merges = [tuple(m.split(" ", 1)) for m in listed]
    else:
        scores = _typed(reader, path, "tokenizer.ggml.scores", "numbers", None)
        if scores is None or len(scores) != len(tokens):
            raise CheckpointError(f"{path.name}: a SentencePiece vocabulary needs one score per token (GGUF metadata "
                                  "'tokenizer.ggml.scores') to order its merges; convert the checkpoint again.")
        merges = _generate_merges(vocab, dict(zip(tokens, scores)))
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    except Exception as err:  # tokenizers raises a bare Exception for a vocabulary it cannot use
        raise CheckpointError(f"{path.name}: the GGUF vocabulary does not form a BPE tokenizer ({err}). The file is "
                              "corrupt: convert the checkpoint again.") from None
    if prefix_by_normalizer:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                            if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    return tok, tokens


def _generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies, as transformers' ``generate_merges``: every token cut into
    two tokens of the vocabulary (the pairs of one token by their ids), all ordered by the token's score, best first,
    then by the lengths of the two parts."""
    merges = []
    for token, score in scores.items():
        pairs = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        merges += sorted(pairs, key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    merges.sort(key=lambda pair: (pair[2], len(pair[0]), len(pair[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _special(reader, role: str) -> str | None:
    key = {"unk": "unknown", "pad": "padding"}.get(role, role)
    token_id, tokens = _get(reader, f"tokenizer.ggml.{key}_token_id"), reader.fields.get("tokenizer.ggml.tokens")
    if not isinstance(token_id, int) or tokens is None or not 0 <= token_id < len(tokens.data):
        return None
    try:
        return bytes(tokens.parts[tokens.data[token_id]]).decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"GGUF token {token_id} ({role}) is not valid UTF-8 text: the file is corrupt. "
                              "Download it again.") from None


def tokenizer_config(path: str | os.PathLike) -> dict:
    """``tokenizer_config.json``: special tokens by role, BOS/EOS flags, the chat template, the context length."""
    reader = _reader(path)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": _adds(reader, "bos"), "add_eos_token": _adds(reader, "eos")}
    for role in ("bos", "eos", "unk", "pad"):
        if (token := _special(reader, role)) is not None:
            config[f"{role}_token"] = token
    arch, path = _get(reader, "general.architecture"), Path(path)
    if (context := _typed(reader, path, f"{arch}.context_length", "count")) is not None:
        config["model_max_length"] = context
    if (template := _typed(reader, path, "tokenizer.chat_template", "text")) is not None:
        config["chat_template"] = template
    return config


def write_tokenizer(path: str | os.PathLike, directory: str | os.PathLike) -> list[str]:
    """Write tokenizer.json + tokenizer_config.json derived from the file into ``directory``; returns the names
    written ([] when the tokenizer model is one kiln cannot rebuild: the caller looks elsewhere)."""
    tok = build_tokenizer(path)
    if tok is None:
        return []
    directory = Path(directory)
    tok.save(str(directory / "tokenizer.json"))
    text = json.dumps(tokenizer_config(path), indent=2, ensure_ascii=False) + "\n"
    (directory / "tokenizer_config.json").write_text(text, encoding="utf-8")
    return ["tokenizer.json", "tokenizer_config.json"]
