"""The Whisper reference (kiln/graphs/whisper) against transformers' WhisperForConditionalGeneration on tiny random
configs: 80 and 128 mel bins, encoder and decoder of different depths (distil-whisper's shape); logits, hidden states
and attentions, the cache, left-padded batches, greedy decoding, save_pretrained, and the errors."""

from __future__ import annotations

import json

import pytest
import torch

from kiln.errors import ConfigError, InputError
from kiln.graphs.checkpoint import from_pretrained

transformers = pytest.importorskip("transformers")

TASK = "automatic-speech-recognition"
START, EOS = 100, 101  # decoder_start_token_id and <|endoftext|> of the tiny vocabulary

CONFIGS = {
    # distil-whisper's shape: a deeper encoder than decoder
    "80-mels-distil": dict(num_mel_bins=80, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                           decoder_attention_heads=4),
    # large-v3's 128 mel bins; fewer heads in the encoder than in the decoder
    "128-mels": dict(num_mel_bins=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=4),
}


def tiny_whisper(name: str, seed: int = 0, **overrides):
    config = transformers.WhisperConfig(
        vocab_size=120, d_model=32, encoder_ffn_dim=37, decoder_ffn_dim=41, max_source_positions=30,
        max_target_positions=40, decoder_start_token_id=START, eos_token_id=EOS, pad_token_id=EOS,
        bos_token_id=EOS, begin_suppress_tokens=None, suppress_tokens=None, **CONFIGS[name] | overrides)
    torch.manual_seed(seed)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers initializes some of these at zero; random values test the mapping
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, kiln reference) with the same weights, through a saved checkpoint."""
    hf = tiny_whisper(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, from_pretrained(path, task=TASK)


def features(hf, batch: int = 2, seed: int = 1) -> torch.Tensor:
    config = hf.config
    return torch.randn(batch, config.num_mel_bins, 2 * config.max_source_positions,
                       generator=torch.Generator().manual_seed(seed))


def test_logits_and_encoder_output_match_transformers(pair):
    hf, ours = pair
    feats = features(hf)
    ids = torch.tensor([[START, 5, 17, 3, 9], [START, 8, 2, 64, 1]])
    with torch.no_grad():
        theirs = hf(input_features=feats, decoder_input_ids=ids)
        out = ours(input_features=feats, decoder_input_ids=ids)
    torch.testing.assert_close(out["logits"], theirs.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["encoder_last_hidden_state"], theirs.encoder_last_hidden_state, atol=1e-4, rtol=0)
    assert len(out["cross_key_values"]) == hf.config.decoder_layers


def test_hidden_states_and_attentions_match_transformers(pair, tmp_path):
    hf, ours = pair
    eager = transformers.WhisperForConditionalGeneration.from_pretrained(
        _saved(hf, tmp_path), attn_implementation="eager").eval()
    feats, ids = features(hf), torch.tensor([[START, 5, 17], [START, 8, 2]])
    with torch.no_grad():
        theirs = eager(input_features=feats, decoder_input_ids=ids, output_hidden_states=True,
                       output_attentions=True)
        out = ours(input_features=feats, decoder_input_ids=ids, output_hidden_states=True, output_attentions=True)
    for name in ("encoder_hidden_states", "decoder_hidden_states", "encoder_attentions", "decoder_attentions",
                 "cross_attentions"):
        expected = getattr(theirs, name)
        assert len(out[name]) == len(expected), name
        for a, b in zip(out[name], expected):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=name)


def test_alignment_weights_are_transformers_cross_attentions(pair, tmp_path):
    """use_generation_config's alignment heads: forward(output_alignment=True) returns those heads' cross-attention
    probabilities, in the config's order (what word timestamps read); pairs out of range are refused."""
    hf, ours = pair
    eager = transformers.WhisperForConditionalGeneration.from_pretrained(
        _saved(hf, tmp_path), attn_implementation="eager").eval()
    layers = hf.config.decoder_layers
    heads = [[layers - 1, 3], [0, 1], [layers - 1, 0]]
    ours.use_generation_config({"alignment_heads": heads})
    feats, ids = features(hf), torch.tensor([[START, 5, 17], [START, 8, 2]])
    try:
        with torch.no_grad():
            theirs = eager(input_features=feats, decoder_input_ids=ids, output_attentions=True).cross_attentions
            out = ours(input_features=feats, decoder_input_ids=ids, output_alignment=True)
            plain = ours(input_features=feats, decoder_input_ids=ids)
        torch.testing.assert_close(out["alignment_weights"], torch.stack([theirs[l][:, h] for l, h in heads], 1),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(out["logits"], plain["logits"], atol=1e-6, rtol=0)
        assert "alignment_weights" not in plain
        with pytest.raises(InputError, match=f"names \\[{layers}, 0\\], but the decoder has {layers} layers"):
            ours.use_generation_config({"alignment_heads": [[layers, 0]]})
        with pytest.raises(InputError, match="must be \\[layer, head\\] pairs"):
            ours.use_generation_config({"alignment_heads": [[0]]})
    finally:
        ours.use_generation_config({})


def _saved(hf, tmp_path):
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_decoding_over_the_cache_equals_the_full_sequence(pair):
    """Prefill, then one token at a time over the self-attention cache, with the cross-attention keys/values computed
    once by encode(): the logits of the whole sequence at once."""
    hf, ours = pair
    feats, ids = features(hf), torch.tensor([[START, 5, 17, 3, 9, 11], [START, 8, 2, 64, 1, 0]])
    with torch.no_grad():
        full = ours(input_features=feats, decoder_input_ids=ids)["logits"]
        audio = ours.encode(feats)
        step = ours(decoder_input_ids=ids[:, :3], encoder_outputs=audio)
        logits = [step["logits"]]
        for t in range(3, ids.shape[1]):
            step = ours(decoder_input_ids=ids[:, t:t + 1], encoder_outputs=audio,
                        past_key_values=step["present_key_values"])
            logits.append(step["logits"])
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=0)
    assert step["present_key_values"][0][0].shape == (2, hf.config.decoder_attention_heads, 6,
                                                      hf.config.d_model // hf.config.decoder_attention_heads)


def test_left_padded_rows_equal_each_prompt_alone(pair):
    """transformers left-pads the shorter decoder prompts of a batch (long-form decoding with previous text) and
    numbers positions from the first real token; a padded row's logits equal the row decoded alone."""
    hf, ours = pair
    feats = features(hf)
    ids = torch.tensor([[START, 5, 17, 3], [EOS, EOS, START, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = ours(input_features=feats, decoder_input_ids=ids, decoder_attention_mask=mask,
                       decoder_position_ids=positions)["logits"]
        alone = ours(input_features=feats[1:], decoder_input_ids=ids[1:, 2:])["logits"]
        theirs = hf(input_features=feats, decoder_input_ids=ids, decoder_attention_mask=mask,
                    decoder_position_ids=positions).logits
    torch.testing.assert_close(batched[1, 2:], alone[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(batched[:, -1], theirs[:, -1], atol=1e-4, rtol=0)


def test_greedy_decoding_matches_transformers_generate(pair):
    """kiln's reference decoding greedily over its cache gives the tokens of transformers' generation loop (the plain
    one: Whisper's own rules, prompts and suppression belong to the runtime's decode loop)."""
    hf, ours = pair
    feats, start = features(hf), torch.full((2, 1), START)
    with torch.no_grad():
        expected = transformers.GenerationMixin.generate(hf, input_features=feats, decoder_input_ids=start,
                                                         max_new_tokens=8, min_new_tokens=8, do_sample=False)
        audio, ids = ours.encode(feats), start
        step = ours(decoder_input_ids=ids, encoder_outputs=audio)
        for _ in range(8):
            next_id = step["logits"][:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            step = ours(decoder_input_ids=next_id, encoder_outputs=audio, past_key_values=step["present_key_values"])
    assert ids.tolist() == expected.tolist()


def test_save_pretrained_round_trips_through_transformers(pair, tmp_path):
    hf, ours = pair
    ours.save_pretrained(tmp_path / "kiln")
    assert json.loads((tmp_path / "kiln" / "config.json").read_text())["architectures"] == \
        ["WhisperForConditionalGeneration"]
    back = transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path / "kiln").eval()
    feats, ids = features(hf), torch.tensor([[START, 5], [START, 7]])
    with torch.no_grad():
        torch.testing.assert_close(back(input_features=feats, decoder_input_ids=ids).logits,
                                   hf(input_features=feats, decoder_input_ids=ids).logits, atol=0, rtol=0)


def test_a_whisper_model_checkpoint_without_the_head_loads(tmp_path):
    """transformers' WhisperModel saves the same tensors without the "model." prefix and without proj_out."""
    hf = tiny_whisper("80-mels-distil")
    hf.model.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, task=TASK)
    feats, ids = features(hf), torch.tensor([[START, 5], [START, 7]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_features=feats, decoder_input_ids=ids)["logits"],
                                   hf(input_features=feats, decoder_input_ids=ids).logits, atol=1e-4, rtol=0)


def test_bad_inputs_name_the_fix(pair):
    hf, ours = pair
    bins = hf.config.num_mel_bins
    with pytest.raises(InputError, match=rf"shape \(batch, {bins} mel bins, 60 frames\), got \(1, {bins}, 59\)"):
        ours(input_features=torch.zeros(1, bins, 59), decoder_input_ids=torch.tensor([[START]]))
    with pytest.raises(InputError, match="needs decoder_input_ids"):
        ours(input_features=features(hf))
    with pytest.raises(InputError, match="needs input_features, or encoder_outputs"):
        ours(decoder_input_ids=torch.tensor([[START]]))
    with pytest.raises(InputError, match="decoder has 40 positions; 41 tokens"):
        ours(input_features=features(hf, batch=1), decoder_input_ids=torch.zeros(1, 41, dtype=torch.long))


@pytest.mark.parametrize("change, message", [
    ({"d_model": 30}, "'d_model' \\(30\\) must be divisible by 'encoder_attention_heads'"),
    ({"num_mel_bins": 0}, "'num_mel_bins' must be a positive integer"),
    ({"activation_function": "mish"}, "'activation_function' 'mish' is not supported"),
    ({"decoder_start_token_id": 500}, "'decoder_start_token_id' must be a token id below vocab_size"),
    ({"use_weighted_layer_sum": True}, "WhisperForAudioClassification"),
])
def test_config_errors(tmp_path, change, message):
    hf = tiny_whisper("80-mels-distil")
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message):
        from_pretrained(tmp_path, task=TASK)
