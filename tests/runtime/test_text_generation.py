"""text-generation pipeline vs transformers.pipeline / generate: same tokens, same text, same output structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import kiln
from kiln.errors import InputError

PROMPTS = ["hello world", "the river runs through paris and london", "a"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
VARIANTS = {
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "llama-gqa": ("llama", dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=64)),
    "qwen2-mqa": ("qwen2", dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=1, max_position_embeddings=64)),
    # local layers with a 4-token window (generation runs past it; their cache bounded by it), q/k norms; Gemma 2's
    # soft-capping is checked in tests/exporter/test_export_gemma.py
    "gemma3": ("gemma3_text", dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=16, sliding_window=4,
                                   sliding_window_pattern=2, max_position_embeddings=64)),
    # LongRoPE past an original context of 8: a short prompt crosses it while generating, where transformers (and
    # kiln) rerun the whole sequence once; with Phi-4-mini's partial rotary
    "phi4-partial-rotary": ("phi3", dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=1, partial_rotary_factor=0.5,
                                         max_position_embeddings=64, original_max_position_embeddings=8,
                                         rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.2],
                                                       "long_factor": [2.0, 4.0]})),
}


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """Tiny random decoders with a byte-level BPE tokenizer and a ChatML template, exported once per module."""
    from conftest import roberta_tokenizer

    made = {}

    def get(name):
        if name not in made:
            model_type, sizes = VARIANTS[name]
            tokenizer = roberta_tokenizer()
            tokenizer.chat_template = CHATML
            config = transformers.AutoConfig.for_model(model_type, vocab_size=len(tokenizer), initializer_range=0.3,
                                                       bos_token_id=0, pad_token_id=1, eos_token_id=2, **sizes)
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config).eval()
            ckpt = tmp_path_factory.mktemp(name)
            model.save_pretrained(ckpt)
            tokenizer.save_pretrained(ckpt)
            out = tmp_path_factory.mktemp("art") / name
            kiln.export(str(ckpt), out, task="text-generation", batch="1:4")
            made[name] = (ckpt, out, model)
        return made[name]

    return get


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_matches_transformers_pipeline(name, decoders):
    ckpt, out, _ = decoders(name)
    ours = kiln.pipeline("text-generation", out)
    theirs = transformers.pipeline("text-generation", model=str(ckpt), tokenizer=str(ckpt))
    for prompt in PROMPTS[:2]:
        assert ours(prompt, max_new_tokens=12) == theirs(prompt, max_new_tokens=12, do_sample=False)
    # one batch, left-padded inside kiln; transformers runs the prompts one by one
    assert ours(PROMPTS, max_new_tokens=10) == theirs(PROMPTS, max_new_tokens=10, do_sample=False)
    assert ours(PROMPTS[0], max_new_tokens=8, return_full_text=False) == theirs(
        PROMPTS[0], max_new_tokens=8, return_full_text=False, do_sample=False)


def test_options_at_construction_and_generators_match_transformers(decoders):
    ckpt, out, _ = decoders("llama-gqa")
    options = {"max_new_tokens": 5, "return_full_text": False}
    ours = kiln.pipeline("text-generation", out, **options)
    theirs = transformers.pipeline("text-generation", model=str(ckpt), tokenizer=str(ckpt), do_sample=False, **options)
    assert ours(PROMPTS[0]) == theirs(PROMPTS[0])
    assert ours(PROMPTS[1], max_new_tokens=8, return_full_text=True) == theirs(
        PROMPTS[1], max_new_tokens=8, return_full_text=True)
    assert list(ours(p for p in PROMPTS)) == list(theirs(p for p in PROMPTS))
    assert "".join(ours.stream(PROMPTS[1])) == ours(PROMPTS[1])[0]["generated_text"]  # streams take them too
    with pytest.raises(InputError, match="max_new_tokens"):
        kiln.pipeline("text-generation", out, max_new_tokens=0)


def test_tokens_match_generate_with_left_padding_and_repetition_penalty(decoders):
    from kiln.runtime.generate import generate

    ckpt, out, model = decoders("llama-gqa")
    pipe = kiln.pipeline("text-generation", out)
    batch = pipe.tokenizer(PROMPTS, padding_side="left")
    config = pipe.defaults.merge(max_new_tokens=10, repetition_penalty=1.3)
    ours = generate(pipe.decoder, batch.input_ids, batch.attention_mask, config)
    theirs = model.generate(input_ids=torch.from_numpy(batch.input_ids), attention_mask=torch.from_numpy(batch.attention_mask),
                            max_new_tokens=10, do_sample=False, repetition_penalty=1.3)
    np.testing.assert_array_equal(ours, theirs[:, batch.input_ids.shape[1]:].numpy())


def test_chat_is_rendered_with_the_template(decoders):
    ckpt, out, _ = decoders("llama-gqa")
    chat = [{"role": "user", "content": "hello world"}]
    ours = kiln.pipeline("text-generation", out)(chat, max_new_tokens=6)
    theirs = transformers.pipeline("text-generation", model=str(ckpt), tokenizer=str(ckpt))(chat, max_new_tokens=6, do_sample=False)
    assert ours == theirs and ours[0]["generated_text"][-1]["role"] == "assistant"


def test_stream_yields_the_same_text(decoders):
    _, out, _ = decoders("gpt2")
    pipe = kiln.pipeline("text-generation", out)
    pieces = list(pipe.stream(PROMPTS[1], max_new_tokens=12))
    assert len(pieces) > 1
    assert "".join(pieces) == pipe(PROMPTS[1], max_new_tokens=12, return_full_text=False)[0]["generated_text"]


def test_sampling_is_reproducible_with_a_seed(decoders):
    _, out, _ = decoders("gpt2")
    pipe = kiln.pipeline("text-generation", out)
    kwargs = dict(max_new_tokens=12, do_sample=True, top_k=20, top_p=0.9, temperature=1.5)
    a = pipe(PROMPTS[0], seed=1, **kwargs)
    assert a == pipe(PROMPTS[0], seed=1, **kwargs)
    assert any(pipe(PROMPTS[0], seed=s, **kwargs) != a for s in range(2, 6))


def test_eos_and_stop_strings_end_generation(decoders):
    _, out, _ = decoders("gpt2")
    pipe = kiln.pipeline("text-generation", out)
    full = pipe(PROMPTS[0], max_new_tokens=12, return_full_text=False)[0]["generated_text"]
    stop = full[2:4]
    stopped = pipe(PROMPTS[0], max_new_tokens=12, return_full_text=False, stop_strings=(stop,))[0]["generated_text"]
    assert stop in stopped and len(stopped) < len(full) and full.startswith(stopped)


@pytest.mark.parametrize("call, message", [
    (lambda p: p(""), "empty prompt"),
    (lambda p: p("hello", max_new_tokens=0), "max_new_tokens"),
    (lambda p: p("hello", max_new_tokens=-3), "max_new_tokens"),
    (lambda p: p("hello", do_sample=True, top_p=1.5), "top_p"),
    (lambda p: p("hello", do_sample=True, top_p=0.0), "top_p"),
    (lambda p: p("paris " * 40, max_new_tokens=30), "context window of 64 tokens"),
    (lambda p: p("hello", max_tokens=5), "Unknown text-generation option"),
    (lambda p: p(42), "got int"),
])
def test_bad_input(call, message, decoders):
    _, out, _ = decoders("gpt2")
    with pytest.raises(InputError, match=message):
        call(kiln.pipeline("text-generation", out))


def test_long_prompts_truncate_from_the_left_when_asked(decoders, caplog):
    _, out, _ = decoders("gpt2")
    pipe = kiln.pipeline("text-generation", out)
    long_prompt = "paris " * 40 + "the river"
    with caplog.at_level("WARNING", logger="kiln"):
        text = pipe(long_prompt, max_new_tokens=30, truncation=True, return_full_text=False)[0]["generated_text"]
    assert "to its last 34 tokens" in caplog.text
    ids = pipe.tokenizer([long_prompt], truncation=None).input_ids[0, -34:]
    short = pipe.tokenizer.decode(ids, skip_special_tokens=False)
    assert text == pipe(short, max_new_tokens=30, add_special_tokens=False, return_full_text=False)[0]["generated_text"]


def test_cli_run_stream(decoders, capsys):
    from kiln.cli.__main__ import main

    _, out, _ = decoders("gpt2")
    assert main(["run", str(out), PROMPTS[0], "--max-new-tokens", "6", "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert main(["run", str(out), PROMPTS[0], "--max-new-tokens", "6"]) == 0
    import json

    greedy = json.loads(capsys.readouterr().out)["output"]
    assert streamed.rstrip("\n") == greedy[0]["generated_text"]
    assert main(["run", str(out), PROMPTS[0], "--max-new-tokens", "6", "--prompt-lookup", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == greedy  # prompt lookup gives greedy's text
    assert main(["run", str(out), PROMPTS[0], "--max-new-tokens", "6", "--num-beams", "3",
                 "--num-return-sequences", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)["output"]) == 2


def test_one_pipeline_serves_many_threads(decoders):
    from concurrent.futures import ThreadPoolExecutor

    _, out, _ = decoders("llama-gqa")
    pipe = kiln.pipeline("text-generation", out)
    prompts = [PROMPTS[i % 3] for i in range(24)]
    serial = [pipe(p, max_new_tokens=6) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda p: pipe(p, max_new_tokens=6), prompts)) == serial


class PlainEngine:
    """The engine interface with nothing kept on the engine's side: every output, kept or not, comes back as numpy
    and goes back in as numpy (what an engine without handles does)."""

    def __init__(self, engine):
        self.engine, self.name = engine, "plain"
        self.inputs, self.optional_inputs, self.outputs = engine.inputs, engine.optional_inputs, engine.outputs

    def run(self, feed, outputs=None, keep=(), into=None):  # into ignored: the presents come back as new arrays
        return self.engine.run(feed, outputs=[*(outputs or []), *keep, *(into or ())] or None)

    def release(self):
        pass


def test_io_binding_and_plain_feeds_agree(decoders):
    from kiln.runtime.generate import DecoderSession, generate

    _, out, _ = decoders("qwen2-mqa")
    pipe = kiln.pipeline("text-generation", out)
    batch = pipe.tokenizer(PROMPTS, padding_side="left")
    config = pipe.defaults.merge(max_new_tokens=8)
    plain = DecoderSession(PlainEngine(pipe.engine))
    np.testing.assert_array_equal(generate(pipe.decoder, batch.input_ids, batch.attention_mask, config),
                                  generate(plain, batch.input_ids, batch.attention_mask, config))


@pytest.mark.parametrize("model", ["llama-gqa", "gpt2"])
def test_the_decode_loop_keeps_the_cache_in_onnxruntime_and_feeds_logits_to_keep(decoders, model):
    """LLaMA's graph writes its cache in place: every step binds the same buffer per layer as past and present.
    GPT-2's concatenates: each step's presents stay OrtValues, fed back as the next step's pasts."""
    import onnxruntime as ort

    _, out, _ = decoders(model)
    pipe = kiln.pipeline("text-generation", out)
    assert [i.name for i in pipe.engine.optional_inputs()] == ["logits_to_keep"]
    assert pipe.decoder.in_place == (model == "llama-gqa")
    calls, run = [], pipe.engine.run

    def spy(feed, outputs=None, keep=(), into=None):
        calls.append((feed, into))
        return run(feed, outputs, keep, into=into)

    pipe.engine.run = spy
    pipe(PROMPTS[1], max_new_tokens=3)
    assert len(calls) == 3 and all(int(feed["logits_to_keep"]) == 1 for feed, _ in calls)
    pasts = [[v for k, v in feed.items() if k.startswith("past_key_values")] for feed, _ in calls]
    layers = len(pasts[0])
    if model == "gpt2":
        assert all(into is None for _, into in calls)
        assert all(isinstance(v, ort.OrtValue) for step in pasts[1:] for v in step)
        return
    assert all(len(into) == layers and all(a is b for a, b in zip(into.values(), step))
               for (_, into), step in zip(calls, pasts))
    assert all(a is b for a, b in zip(pasts[0], pasts[2]))  # one buffer per layer for the whole generation


def test_a_generation_leaves_no_kv_cache_bound_in_its_thread(decoders):
    _, out, _ = decoders("llama-gqa")
    pipe = kiln.pipeline("text-generation", out)
    pipe(PROMPTS[1], max_new_tokens=6)
    # the thread's IO binding would otherwise keep the last step's presents (the whole cache) alive
    assert pipe.engine._local.binding.get_outputs() == []


def test_an_abandoned_stream_stops_generating(decoders):
    _, out, _ = decoders("gpt2")
    pipe = kiln.pipeline("text-generation", out)
    steps, step = [], pipe.decoder.step

    def counted_step(*args):
        steps.append(1)
        return step(*args)

    pipe.decoder.step = counted_step
    pieces = pipe.stream(PROMPTS[0], max_new_tokens=50, eos_token_id=[])  # no EOS: only max_new_tokens ends it
    assert steps == []  # nothing runs before the first piece is asked for
    next(pieces)
    taken = len(steps)
    pieces.close()  # what a server does when its client goes away
    assert len(steps) == taken < 50  # no step after the close: the loop runs only as pieces are read
    assert pipe.engine._local.binding.get_outputs() == []  # and the close released the cache


def test_batch_runs_chats_and_prompts_in_separate_calls(decoders):
    _, out, _ = decoders("llama-gqa")
    pipe = kiln.pipeline("text-generation", out)
    chat = [{"role": "user", "content": "hello world"}]
    items = [PROMPTS[0], chat, PROMPTS[1], chat]
    # chats hold their special tokens already, prompts get them added: the same as calling for each item alone
    assert pipe.batch(items, max_new_tokens=4) == [pipe(item, max_new_tokens=4) for item in items]
    assert pipe.batch([PROMPTS[2]], max_new_tokens=4) == [pipe(PROMPTS[2], max_new_tokens=4)]


@pytest.mark.parametrize("options", [{"no_repeat_ngram_size": 2}, {"no_repeat_ngram_size": 1},
                                     {"min_new_tokens": 12, "max_new_tokens": 14}])
def test_no_repeat_ngram_size_and_min_new_tokens_match_transformers(options, decoders):
    """Each prompt alone and the prompts as one left-padded batch give transformers' tokens for each prompt alone
    (kiln's n-grams leave the left padding out)."""
    ckpt, out, _ = decoders("llama-gqa")
    ours = kiln.pipeline("text-generation", out)
    theirs = transformers.pipeline("text-generation", model=str(ckpt), tokenizer=str(ckpt))
    options = {"max_new_tokens": 10, **options}
    expected = [theirs(prompt, do_sample=False, eos_token_id=[5, 9], **options) for prompt in PROMPTS]
    assert [ours(prompt, eos_token_id=[5, 9], **options) for prompt in PROMPTS] == expected
    assert ours(PROMPTS, eos_token_id=[5, 9], **options) == expected


@pytest.mark.parametrize("name,options", [
    ("llama-gqa", {"num_beams": 3}),
    ("gpt2", {"num_beams": 4, "length_penalty": 0.5}),
    ("gemma3", {"num_beams": 2, "repetition_penalty": 1.3, "eos_token_id": [5, 9]}),
    ("qwen2-mqa", {"num_beams": 3, "no_repeat_ngram_size": 2, "min_new_tokens": 4}),
    ("llama-gqa", {"num_beams": 3, "early_stopping": True, "eos_token_id": [5, 9]}),
    ("gpt2", {"num_beams": 3, "early_stopping": "never", "length_penalty": 1.5, "eos_token_id": [5, 9]}),
    ("llama-gqa", {"num_beams": 4, "num_return_sequences": 3, "eos_token_id": [5, 9]}),
])
def test_beam_search_matches_transformers(name, options, decoders):
    """num_beams > 1: transformers' beam search (2 x beams candidates, finished beams by score / length **
    length_penalty, its stopping heuristic), each beam's cache reordered after every step; the pipeline's text equals
    transformers' pipeline's for each prompt alone and for the prompts as one left-padded batch (gemma3: a window
    shorter than the generation, its bounded cache reordered too), and generate's tokens."""
    from kiln.runtime.generate.beam import beam_search

    ckpt, out, model = decoders(name)
    ours = kiln.pipeline("text-generation", out)
    theirs = transformers.pipeline("text-generation", model=str(ckpt), tokenizer=str(ckpt))
    options = {"max_new_tokens": 10, **options}
    expected = [theirs(prompt, do_sample=False, **options) for prompt in PROMPTS]
    assert [ours(prompt, **options) for prompt in PROMPTS] == expected
    assert ours(PROMPTS, **options) == expected
    pipe = ours
    batch = pipe.tokenizer(PROMPTS[:2], padding_side="left")
    config = pipe.defaults.merge(**options)
    n = config.num_return_sequences
    rows = beam_search(pipe.decoder, batch.input_ids, batch.attention_mask, config, config.num_beams,
                       config.length_penalty, early_stopping=config.early_stopping, num_return_sequences=n)
    for i, (ids, mask) in enumerate(zip(batch.input_ids, batch.attention_mask)):
        ids = torch.from_numpy(ids[mask == 1][None])
        hf = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            **options)[:, ids.shape[1]:].tolist()
        assert rows[i * n:(i + 1) * n] == [seq[:next((k for k, t in enumerate(seq) if t in config.eos_ids), len(seq))]
                                           for seq in hf]


def test_beam_search_refuses_what_it_cannot_do(decoders):
    _, out, _ = decoders("llama-gqa")
    pipe = kiln.pipeline("text-generation", out)
    with pytest.raises(InputError, match="do_sample=True with num_beams=3: kiln samples with one beam"):
        pipe(PROMPTS[0], num_beams=3, do_sample=True)
    with pytest.raises(InputError, match="stop_strings with num_beams=2 are not supported"):
        pipe(PROMPTS[0], num_beams=2, stop_strings=["x"])
    with pytest.raises(InputError, match="num_beams=5 runs 5 rows at once, but this artifact takes batches of at "
                                         "most 4: use num_beams <= 4, or re-export with --batch 1:5"):
        pipe(PROMPTS[0], num_beams=5)
    with pytest.raises(InputError, match="num_return_sequences=2 with num_beams=1: greedy decoding gives one"):
        pipe(PROMPTS[0], num_return_sequences=2)
    with pytest.raises(InputError, match="early_stopping='always' is out of range"):
        pipe(PROMPTS[0], num_beams=2, early_stopping="always")
    with pytest.raises(InputError, match="stream\\(\\) yields one sequence"):
        list(pipe.stream(PROMPTS[0], do_sample=True, num_return_sequences=2))
    samples = pipe(PROMPTS[:2], do_sample=True, num_return_sequences=3, seed=0, max_new_tokens=6)
    assert [len(s) for s in samples] == [3, 3] and len({s["generated_text"] for s in samples[0]}) > 1
    with pytest.raises(InputError, match="num_beams=0 is out of range"):
        pipe(PROMPTS[0], num_beams=0)
    with pytest.raises(InputError, match="stream\\(\\) with num_beams=2"):
        list(pipe.stream(PROMPTS[0], num_beams=2))
    _, out, _ = decoders("phi4-partial-rotary")
    with pytest.raises(InputError, match="num_beams > 1 over 8 tokens: this model switches its rotary factors"):
        kiln.pipeline("text-generation", out)(PROMPTS[0], num_beams=2, max_new_tokens=10)


@pytest.mark.parametrize("name,options", [("llama-gqa", {}), ("gpt2", {"repetition_penalty": 1.2}),
                                          ("qwen2-mqa", {"no_repeat_ngram_size": 3, "min_new_tokens": 18})])
def test_prompt_lookup_decoding_gives_greedy_text(name, options, decoders, monkeypatch):
    """prompt_lookup_num_tokens: candidates checked in one pass, the processors applied position by position, the
    rejected candidates cut from the cache: the text is greedy's (kiln's and transformers' pipelines, transformers'
    own prompt lookup too), streamed too. Random weights seldom repeat themselves, so the passes are counted with
    candidates that are right (greedy's own continuation: a pass per 1 + 4 tokens) and wrong (a pass per token)."""
    import kiln.runtime.generate.loop as loop

    ckpt, out, _ = decoders(name)
    pipe = kiln.pipeline("text-generation", out)
    theirs = transformers.pipeline("text-generation", model=str(ckpt), tokenizer=str(ckpt))
    prompt = "the river runs through paris and london. the river runs through paris and london. the river"
    options = {"max_new_tokens": 24, **options}
    expected = theirs(prompt, do_sample=False, **options)
    assert theirs(prompt, do_sample=False, prompt_lookup_num_tokens=4, **options) == expected
    assert pipe(prompt, prompt_lookup_num_tokens=4, **options) == expected
    assert "".join(pipe.stream(prompt, prompt_lookup_num_tokens=4, **options)) == \
        expected[0]["generated_text"][len(prompt):]

    prompt_ids = len(pipe.tokenizer([prompt]).input_ids[0])
    greedy = []
    for tokens in loop.steps(pipe.decoder, pipe.tokenizer([prompt]).input_ids, pipe.tokenizer([prompt]).attention_mask,
                             pipe.defaults.merge(**options)):
        greedy.append(int(tokens[0]))
    runs, run = [], pipe.engine.run
    monkeypatch.setattr(pipe.engine, "run", lambda *args, **kwargs: runs.append(1) or run(*args, **kwargs))
    for guess, passes in ((lambda seq, k, n: greedy[len(seq) - prompt_ids:][:k], -(-24 // 5)),
                          (lambda seq, k, n: [(t + 1) % 300 for t in greedy[len(seq) - prompt_ids:][:k]], 24)):
        monkeypatch.setattr(loop, "lookup_candidates", guess)
        runs.clear()
        assert pipe(prompt, prompt_lookup_num_tokens=4, **options) == expected
        assert len(runs) == passes


def test_lookup_candidates_as_transformers():
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    from kiln.runtime.generate.loop import lookup_candidates

    rng = np.random.default_rng(0)
    for case in range(300):
        sequence = [int(t) for t in rng.integers(0, 6, int(rng.integers(2, 30)))]
        tokens, ngram = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        theirs = PromptLookupCandidateGenerator(num_output_tokens=tokens, max_matching_ngram_size=ngram,
                                                max_length=1000)
        ids, _ = theirs.get_candidates(torch.tensor([sequence]))
        assert lookup_candidates(sequence, tokens, ngram) == ids[0, len(sequence):].tolist(), (sequence, tokens, ngram)


def test_prompt_lookup_refuses_what_it_cannot_do(decoders):
    _, out, _ = decoders("llama-gqa")
    pipe = kiln.pipeline("text-generation", out)
    with pytest.raises(InputError, match="prompt_lookup_num_tokens decodes one prompt at a time"):
        pipe(PROMPTS[:2], prompt_lookup_num_tokens=3)
    with pytest.raises(InputError, match="it does not go with do_sample, num_beams or num_return_sequences"):
        pipe(PROMPTS[0], prompt_lookup_num_tokens=3, num_beams=2)
    with pytest.raises(InputError, match="prompt_lookup_num_tokens=0 is out of range"):
        pipe(PROMPTS[0], prompt_lookup_num_tokens=0)
    _, out, _ = decoders("gemma3")
    with pytest.raises(InputError, match="window-bounded"):
        kiln.pipeline("text-generation", out)(PROMPTS[0], prompt_lookup_num_tokens=3)
