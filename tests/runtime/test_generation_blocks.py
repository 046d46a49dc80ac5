"""Generation building blocks vs transformers: logits processors, token choice, stopping, streaming, chat templates."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from kiln.errors import InputError
from kiln.runtime.generate import (GenerationConfig, StopChecker, StreamDecoder, chat_template_from, process_logits,
                                   render_chat, select_next)

V = 64


@pytest.fixture(scope="module")
def oracle():
    """transformers' own processor list for a GenerationConfig, from a tiny model's ``_get_logits_processor``: the
    order and the options that switch each processor on are what ``generate`` does, not our reading of it."""
    import torch
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=8, n_layer=1, n_head=2))

    def processors(config: GenerationConfig, mask: np.ndarray, new_tokens: int = 0):
        hf = transformers.GenerationConfig(do_sample=config.do_sample, temperature=config.temperature,
                                           top_k=config.top_k, top_p=config.top_p,
                                           repetition_penalty=config.repetition_penalty,
                                           no_repeat_ngram_size=config.no_repeat_ngram_size or None,
                                           min_new_tokens=config.min_new_tokens or None,
                                           eos_token_id=config.eos_token_id)
        hf._eos_token_tensor = None if config.eos_token_id is None else torch.tensor(config.eos_ids)
        return model._get_logits_processor(generation_config=hf, input_ids_seq_length=mask.shape[1] - new_tokens,
                                           device="cpu", model_kwargs={"attention_mask": torch.from_numpy(mask)})
    return processors


CONFIGS = [
    {},
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.7},
    {"do_sample": True},
    {"do_sample": True, "temperature": 0.6},
    {"do_sample": True, "temperature": 1.7, "top_k": 5},
    {"do_sample": True, "top_k": 1},
    {"do_sample": True, "top_k": 1000},  # more than the vocabulary: keeps everything
    {"do_sample": True, "top_p": 0.8},
    {"do_sample": True, "top_p": 0.01},  # keeps the single most likely token
    {"do_sample": True, "top_p": 1.0},
    {"do_sample": True, "top_k": 10, "top_p": 0.9, "temperature": 0.8, "repetition_penalty": 1.2},
    {"do_sample": True, "top_k": 3, "top_p": 0.5, "temperature": 2.0},
    {"do_sample": False, "top_k": 3, "top_p": 0.5, "temperature": 0.5, "repetition_penalty": 1.5},  # warpers off
    {"no_repeat_ngram_size": 2},
    {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2},
    {"no_repeat_ngram_size": 20},  # longer than the sequence: nothing to ban
    {"min_new_tokens": 5, "eos_token_id": [3, 7]},
    {"min_new_tokens": 2, "eos_token_id": 3, "do_sample": True, "top_k": 5},  # reached at the third seed's step
]


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_process_logits_matches_transformers(options, seed, oracle):
    import torch

    rng = np.random.default_rng(seed)
    B, N = 4, 12
    logits = (rng.standard_normal((B, V)) * 3).astype(np.float32)
    if seed == 2:  # many ties: top-k keeps every token equal to the k-th score
        logits = np.round(logits / 2).astype(np.float32)
    generated = rng.integers(0, V, size=(B, N))
    generated[0, :4] = generated[0, 4]  # repeats are penalized once
    mask = np.ones((B, N), dtype=np.int64)
    mask[1, :3] = 0  # left padding: not penalized
    generated[1, :3] = 0
    mask[2, -1] = 0  # a 0 after the first 1 does not count as padding in transformers
    generated[3, -2:] = generated[3, 5:7]  # row 3 ends as it went earlier: n-grams to ban
    config = GenerationConfig(**options)

    new_tokens = seed  # how many of the N ids are new (min_new_tokens counts them)
    ours = process_logits(logits, generated, config, attention_mask=mask, new_tokens=new_tokens)
    theirs = oracle(config, mask, new_tokens)(torch.from_numpy(generated), torch.from_numpy(logits.copy())).numpy()
    if config.no_repeat_ngram_size in (2, 3) or (config.min_new_tokens > new_tokens):
        assert np.isneginf(ours).any()  # the case bans something
    assert ours.dtype == np.float32 and ours.shape == (B, V)
    if config.no_repeat_ngram_size:  # kiln leaves row 1's left padding out of its n-grams (batched = alone)
        alone = oracle(config, mask[1:2, 3:])(torch.from_numpy(generated[1:2, 3:]), torch.from_numpy(logits[1:2].copy()))
        np.testing.assert_array_equal(np.isneginf(ours[1]), np.isneginf(alone.numpy()[0]))
        keep = [0, 2, 3]
        ours, theirs, logits, mask = ours[keep], theirs[keep], logits[keep], mask[keep]
    if seed == 2 and config.do_sample and (config.top_p or 1.0) < 1.0:
        # which of several tied tokens top-p drops depends on torch's unstable sort; how many does not
        np.testing.assert_array_equal(np.isneginf(ours).sum(-1), np.isneginf(theirs).sum(-1))
        np.testing.assert_allclose(np.sort(ours, -1), np.sort(theirs, -1), rtol=1e-6, atol=1e-6)
        return
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


def test_repetition_penalty_counts_the_prompt_and_skips_ids_outside_the_vocabulary():
    logits = np.array([[2.0, -2.0, 1.0, 4.0]], dtype=np.float32)
    generated = np.array([[0, 1, 1, 9]])  # 9 >= V: the embedding may be larger than the lm_head
    out = process_logits(logits, generated, GenerationConfig(repetition_penalty=2.0))
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0, 4.0]])


def test_greedy_is_argmax():
    scores = np.random.default_rng(0).standard_normal((5, V)).astype(np.float32)
    np.testing.assert_array_equal(select_next(scores, GenerationConfig(), np.random.default_rng()), scores.argmax(-1))


def test_sampling_is_reproducible_and_follows_softmax():
    config = GenerationConfig(do_sample=True, seed=123)
    scores = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], dtype=np.float32))
    scores = np.append(scores, np.float32(-np.inf))  # filtered out
    batch = np.tile(scores, (40_000, 1))
    first = select_next(batch, config, config.rng())
    np.testing.assert_array_equal(first, select_next(batch, config, config.rng()))
    assert first.dtype == np.int64 and first.shape == (40_000,)
    counts = np.bincount(first, minlength=6)
    assert counts[5] == 0  # a filtered token is never drawn
    expected = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) * len(first)
    chi2 = ((counts[:5] - expected) ** 2 / expected).sum()
    assert chi2 < 18.5, (counts, chi2)  # 4 degrees of freedom: p = 0.001


def test_sampling_after_top_k_draws_only_kept_tokens():
    config = GenerationConfig(do_sample=True, top_k=3, seed=0)
    logits = np.random.default_rng(1).standard_normal((2000, V)).astype(np.float32)
    drawn = select_next(process_logits(logits, np.zeros((2000, 1), np.int64), config), config, config.rng())
    top3 = np.argsort(logits, axis=-1)[:, -3:]
    assert (top3 == drawn[:, None]).any(axis=1).all()


@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("max_new_tokens", 2.5), ("temperature", 0.0),
                                         ("temperature", -1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
                                         ("repetition_penalty", 0), ("eos_token_id", -3), ("stop_strings", ("",)),
                                         ("no_repeat_ngram_size", -1), ("no_repeat_ngram_size", True),
                                         ("min_new_tokens", 1.5)])
def test_config_rejects_out_of_range_values(field, value):
    with pytest.raises(InputError, match=field):
        GenerationConfig.from_dict({field: value})
    with pytest.raises(InputError, match=field):
        GenerationConfig().merge(**{field: value})


def test_config_from_dict_merge_and_unknown_keys():
    config = GenerationConfig.from_dict({"do_sample": True, "top_k": 5, "eos_token_id": [2, 7],
                                         "stop_strings": "\n\n"})
    assert config.eos_ids == (2, 7) and config.stop_strings == ("\n\n",)
    merged = config.merge(top_k=0, temperature=None, max_new_tokens=3)
    assert (merged.top_k, merged.temperature, merged.max_new_tokens, merged.do_sample) == (0, 1.0, 3, True)
    with pytest.raises(InputError, match="max_tokens"):
        GenerationConfig.from_dict({"max_tokens": 4})


def test_config_from_artifact(tmp_path):
    import transformers

    assert GenerationConfig.from_artifact(tmp_path) == GenerationConfig()
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0, do_sample=True,
                                  temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.1,
                                  max_new_tokens=64).save_pretrained(tmp_path)
    config = GenerationConfig.from_artifact(tmp_path)
    assert (config.bos_token_id, config.eos_ids, config.pad_token_id) == (1, (2, 3), 0)
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 0.6, 0.9, 20)
    assert (config.repetition_penalty, config.max_new_tokens) == (1.1, 64)


# ---------------------------------------------------------------------------------------------- stopping

PIECES = ["st", "op", "stop", "opera", "sto", "pper", "las", "topper", "s", "to", "pped", "at", "x", "\n"]


def toy_decode(ids):
    return "".join(PIECES[i] for i in ids)


def test_stop_checker_eos_list_pads_finished_rows_and_counts_length():
    config = GenerationConfig(eos_token_id=[6, 8], pad_token_id=7, max_new_tokens=3)  # ids, no text here
    stop = StopChecker(config, batch=3)
    tokens = stop.fill(np.array([6, 5, 5]))
    np.testing.assert_array_equal(stop.update(tokens), [True, False, False])
    tokens = stop.fill(np.array([5, 8, 5]))
    np.testing.assert_array_equal(tokens, [7, 8, 5])
    np.testing.assert_array_equal(stop.update(tokens), [True, True, False])
    assert not stop.all_done
    stop.update(stop.fill(np.array([5, 5, 5])))
    assert stop.all_done and stop.finish_reason == ["eos", "eos", "length"]


def test_stop_checker_pads_with_the_first_eos_without_a_pad_id():
    stop = StopChecker(GenerationConfig(eos_token_id=[6, 8]), batch=2)
    stop.update(np.array([8, 5]))
    np.testing.assert_array_equal(stop.fill(np.array([1, 1])), [6, 1])


@pytest.mark.parametrize("ids,stops_at", [([0, 1], 2), ([2, 11], 1), ([0, 3], 2), ([4, 5], 2), ([6, 7], 2),
                                          ([8, 9, 10], 3), ([12, 13, 11, 13, 13], 5), ([12, 8, 9, 11, 12], None)])
def test_stop_strings_match_when_they_overlap_the_newest_token(ids, stops_at):
    # the positive and negative cases of transformers' StopStringCriteria docstring, with "stop"
    stop = StopChecker(GenerationConfig(stop_strings=("stop", "\n\n"), max_new_tokens=10), batch=1, decode=toy_decode)
    done_at = next((step for step, i in enumerate(ids, 1) if stop.update(np.array([i]))[0]), None)
    assert done_at == stops_at
    assert stop.finish_reason == (["stop"] if stops_at else [None])


def test_stop_strings_need_a_decode_function():
    with pytest.raises(InputError, match="decode"):
        StopChecker(GenerationConfig(stop_strings=("x",)), batch=1)


# ---------------------------------------------------------------------------------------------- streaming

TEXT = ["Café crème brûlée 🍰 à Paris 🇫🇷!", "naïve façade — 日本語 テキスト 🤖🤖", "Ünïcödé ✨ emoji 😀 mixed ascii text"]


def stream(decode, ids):
    streamer = StreamDecoder(decode)
    pieces = [streamer.push(i) for i in ids]
    return pieces, streamer.flush()


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_stream_decoder_matches_a_full_decode(kind):
    from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer

    tok = ByteLevelBPETokenizer() if kind == "byte-level" else SentencePieceBPETokenizer()
    tok.train_from_iterator(TEXT[:2], vocab_size=300 if kind == "byte-level" else 60, min_frequency=1,
                            show_progress=False)
    for text in TEXT:
        ids = tok.encode(text).ids
        full = tok.decode(ids)
        pieces, rest = stream(tok.decode, ids)
        assert "".join(pieces) + rest == full
        assert not any("\ufffd" in p for p in pieces) and rest == ""
        if kind == "byte-level":  # the test means something: some token holds part of a character
            assert any("\ufffd" in tok.decode([i]) for i in ids)
        else:  # and words keep the spaces a SentencePiece decode of one token would strip
            assert any(p.startswith(" ") for p in pieces)


def test_stream_decoder_flush_returns_an_incomplete_character():
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(["abc"], vocab_size=260, min_frequency=1, show_progress=False)
    ids = tok.encode("a😀").ids
    pieces, rest = stream(tok.decode, ids[:-1])  # the emoji's last byte never comes
    assert "".join(pieces) == "a" and rest and set(rest) == {"\ufffd"}


# ---------------------------------------------------------------------------------------------- chat templates

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# the helpers transformers' environment adds, block trimming, loop controls and None-valued keys
FANCY = """{{ bos_token }}{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
  {% if m.role == 'system' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  [{{ ns.n }}] {{ m.role }}: {{ m.content }}{% if 'name' in m %} ({{ m.name }}){% endif %} {{ m | tojson }}
{% endfor %}
{% if tools is not none %}tools{% endif %}{% if add_generation_prompt %}{% generation %}assistant:{% endgeneration %}
{% endif %}{{ eos_token }} {{ strftime_now('%Y') }}"""

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Où est la café? <b>&</b>"},
            {"role": "assistant", "content": "Ici 😀", "name": None}, {"role": "user", "content": "Merci", "name": "Jo"}]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXT, vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("template", [CHATML, FANCY], ids=["chatml", "fancy"])
@pytest.mark.parametrize("messages", [MESSAGES, MESSAGES[1:]], ids=["system", "no-system"])
def test_render_chat_matches_apply_chat_template(template, messages, hf_tokenizer, tmp_path):
    hf_tokenizer.chat_template = template
    hf_tokenizer.save_pretrained(tmp_path)
    loaded = chat_template_from(tmp_path)
    assert loaded == template
    for add in (True, False):
        expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert render_chat(messages, loaded, add_generation_prompt=add, bos_token="<s>", eos_token="</s>") == expected


def test_chat_template_from_tokenizer_config(tmp_path):
    assert chat_template_from(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    assert chat_template_from(tmp_path) == CHATML
    named = [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": FANCY}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert chat_template_from(tmp_path) == CHATML and chat_template_from(tmp_path, "tool_use") == FANCY
    with pytest.raises(InputError, match="rag"):
        chat_template_from(tmp_path, "rag")


def test_chat_templates_run_sandboxed():
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role"):
        render_chat([{"role": "tool", "content": "x"}], FANCY)
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat([], "{{ ''.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat([], "{% set ns = namespace(_x=1) %}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat([], "{% set ns = namespace() %}{% set ns._x = 1 %}")


def test_generation_module_is_light():
    code = "import sys, kiln.runtime.generate; print([m for m in ('torch', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
