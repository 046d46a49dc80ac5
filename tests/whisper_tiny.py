"""A tiny random Whisper laid out as the real ones (text, special tokens, timestamps), with the generation config
transformers' Whisper generate reads: shared by the decoding-rule, export and pipeline tests."""

from __future__ import annotations

from pathlib import Path

import torch

# A tiny vocabulary laid out as Whisper's: text, then the special tokens, then the timestamps.
EOS, SOT, LANGS = 100, 101, {"<|en|>": 102, "<|fr|>": 103, "<|de|>": 104, "<|es|>": 105}
TRANSLATE, TRANSCRIBE, PREV, NO_TIMESTAMPS, VOCAB = 106, 107, 109, 111, 140
GENERATION = dict(decoder_start_token_id=SOT, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=EOS,
                  no_timestamps_token_id=NO_TIMESTAMPS, prev_sot_token_id=PREV, lang_to_id=LANGS,
                  task_to_id={"translate": TRANSLATE, "transcribe": TRANSCRIBE}, is_multilingual=True,
                  suppress_tokens=[1, 2, 7, 64], begin_suppress_tokens=[3, EOS], max_initial_timestamp_index=5,
                  alignment_heads=[[1, 0], [1, 2]],
                  forced_decoder_ids=[[1, None], [2, TRANSCRIBE]])  # as the hub's multilingual checkpoints


def tiny_whisper(seed: int = 3):
    """transformers' model with large random weights (varied, confident tokens) and Whisper's 1500 encoder positions:
    transformers' generate treats a model whose window is shorter than 30 s as long-form."""
    import transformers

    config = transformers.WhisperConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=80,
        max_source_positions=1500, max_target_positions=40, decoder_start_token_id=SOT, eos_token_id=EOS,
        pad_token_id=EOS, bos_token_id=EOS)
    torch.manual_seed(seed)
    hf = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    hf.generation_config = transformers.GenerationConfig(**GENERATION)
    return hf


SPECIAL = {EOS: "<|endoftext|>", SOT: "<|startoftranscript|>", **{i: t for t, i in LANGS.items()},
           TRANSLATE: "<|translate|>", TRANSCRIBE: "<|transcribe|>", 108: "<|startoflm|>", PREV: "<|startofprev|>",
           110: "<|nospeech|>", NO_TIMESTAMPS: "<|notimestamps|>",
           **{NO_TIMESTAMPS + 1 + i: f"<|{i * 0.02:.2f}|>" for i in range(VOCAB - NO_TIMESTAMPS - 1)}}


def tiny_tokenizer():
    """A byte-level tokenizer whose 100 text tokens are single characters (no merges), then Whisper's special tokens
    at the tiny vocabulary's ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())[:EOS]
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(SPECIAL[i], special=True, normalized=False) for i in sorted(SPECIAL)])
    assert tokenizer.get_vocab_size() == VOCAB and tokenizer.token_to_id("<|notimestamps|>") == NO_TIMESTAMPS
    return tokenizer


def save_tiny_whisper(path: Path, seed: int = 3, preprocessing: bool = False):
    """The checkpoint; with ``preprocessing``, also its tokenizer.json and preprocessor_config.json (80 mel bins)."""
    hf = tiny_whisper(seed)
    hf.save_pretrained(path)
    if preprocessing:
        import transformers

        tiny_tokenizer().save(str(Path(path) / "tokenizer.json"))
        transformers.WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return hf


def features(batch: int, seed: int) -> torch.Tensor:
    """30 s of random mel frames."""
    return torch.randn(batch, 80, 3000, generator=torch.Generator().manual_seed(seed))


def until_eos(tokens: list[int]) -> list[int]:
    """The tokens before <|endoftext|> (transformers' Whisper appends one to a row cut by max_new_tokens too)."""
    return tokens[:tokens.index(EOS)] if EOS in tokens else tokens
