"""The kiln ModernBERT reference against transformers' ModernBert* classes (eager and SDPA, the paths that keep the
padding), on right-padded batches longer than the local window; its config reading, old keys included; save_pretrained
back into transformers."""

from __future__ import annotations

import json

import pytest
import torch

from kiln.errors import ConfigError
from kiln.graphs.checkpoint import from_pretrained
from kiln.graphs.modernbert.config import ModernBertConfig
from kiln.graphs.modernbert.model_torch import encoder_masks

ATOL = 1e-4
TASKS = {"feature-extraction": "ModernBertModel", "fill-mask": "ModernBertForMaskedLM",
         "text-classification": "ModernBertForSequenceClassification",
         "token-classification": "ModernBertForTokenClassification",
         "question-answering": "ModernBertForQuestionAnswering"}
OUTPUTS = {"feature-extraction": ("last_hidden_state",), "fill-mask": ("logits",), "text-classification": ("logits",),
           "token-classification": ("logits",), "question-answering": ("start_logits", "end_logits")}
# Three layers: global, local, local (transformers' default global_attn_every_n_layers = 3). A window of 4 lets each
# token of a local layer see 2 on either side, so the 12-token batch below is well past it.
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
            local_attention=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            cls_token_id=1, sep_token_id=2, global_rope_theta=1000.0, local_rope_theta=100.0, initializer_range=0.2)
# transformers' defaults (no biases in norms, attention, MLP, head), and every switch the other way.
STYLES = {
    "default": {},
    "biased": dict(norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True, decoder_bias=False,
                   tie_word_embeddings=False, classifier_pooling="mean", hidden_activation="gelu_pytorch_tanh",
                   classifier_activation="silu", num_labels=3),
}


def make_modernbert(path, task: str = "feature-extraction", seed: int = 0, **overrides):
    """Save a tiny random transformers ModernBERT for ``task`` into ``path``; returns the path."""
    import transformers

    config = transformers.ModernBertConfig(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, TASKS[task])(config)
    # Random init leaves norms at identity and biases at 0: perturb them so the test exercises every weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(path)
    return path


def hf_model(path, task: str, attn_impl: str):
    import transformers

    return getattr(transformers, TASKS[task]).from_pretrained(path, attn_implementation=attn_impl).eval()


def make_batch(lengths=(12, 7, 3), vocab: int = 99, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths, pad id 0 where attention_mask is 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def max_diff(got, want, real=None) -> float:
    """Max |got - want| over nested tuples; with ``real`` (B, T), at real tokens only: per-token tensors (B, T, ...)
    at real positions, attention maps (B, H, T, S) in the rows of real queries."""
    if isinstance(want, (tuple, list)):
        assert isinstance(got, tuple) and len(got) == len(want), f"{len(got)} items, expected {len(want)}"
        return max(max_diff(g, w, real) for g, w in zip(got, want))
    assert got.shape == want.shape, f"shape {tuple(got.shape)} vs {tuple(want.shape)}"
    diff = (got - want).abs()
    if real is not None and diff.ndim >= 2 and diff.shape[:2] == real.shape:
        diff = diff[real]
    elif real is not None and diff.ndim == 4:
        diff = diff.transpose(1, 2)[real]  # (real queries, H, S)
    return diff.max().item()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny checkpoints by (task, style), built once."""
    cache = {}

    def get(task: str, style: str = "default"):
        if (task, style) not in cache:
            path = tmp_path_factory.mktemp(f"modernbert-{task}-{style}")
            overrides = dict(STYLES[style])
            if task == "question-answering":  # two outputs, start and end, whatever the style
                overrides.pop("num_labels", None)
            cache[task, style] = make_modernbert(path, task, **overrides)
        return cache[task, style]

    return get


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("task", list(TASKS))
def test_matches_transformers(checkpoints, task, style, attn_impl):
    """Every output, every hidden state and (eager) every attention map, at every real token of a padded batch.
    Padding queries differ only where a local window holds no real token (see ``encoder_masks``): there
    transformers' eager path averages the values, its SDPA returns zeros, and kiln attends to every key."""
    path = checkpoints(task, style)
    hf = hf_model(path, task, attn_impl)
    model = from_pretrained(path, task=task, attn_impl=attn_impl)
    assert model.task == task and not model.training
    eager = attn_impl == "eager"  # transformers returns attention maps from its eager path only
    batch = make_batch()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        want = hf(**batch, output_hidden_states=True, output_attentions=eager)
        got = model(**batch, output_hidden_states=True, output_attentions=eager)
    assert set(got) == {*OUTPUTS[task], "hidden_states", *(["attentions"] if eager else [])}
    assert len(got["hidden_states"]) == TINY["num_hidden_layers"] + 1
    for key in got:
        diff = max_diff(got[key], want[key], real)
        assert diff <= ATOL, f"{task}/{style}/{attn_impl} {key}: max |kiln - transformers| = {diff:.3g}"
    if eager:  # real queries give padded keys exactly zero probability (rows of lengths 12, 7, 3)
        assert all((p[1, :, :7, 7:] == 0).all() and (p[2, :, :3, 3:] == 0).all() for p in got["attentions"])
    with torch.no_grad():
        plain = model(**batch)
    assert set(plain) == set(OUTPUTS[task]), "hidden states and attentions only on request"
    for key in plain:
        assert max_diff(plain[key], got[key]) == 0


@pytest.mark.parametrize("task", ["feature-extraction", "token-classification"])
def test_eager_and_sdpa_agree_everywhere(checkpoints, task):
    """Padding included: no query is left without a key, so every kernel computes the same value."""
    path = checkpoints(task, "biased")
    eager, sdpa = (from_pretrained(path, task=task, attn_impl=impl) for impl in ("eager", "sdpa"))
    batch = make_batch(seed=2)
    with torch.no_grad():
        a = eager(**batch, output_hidden_states=True)
        b = sdpa(**batch, output_hidden_states=True)
        c = sdpa(**batch, output_hidden_states=True, output_attentions=True)
    for key in a:
        assert max_diff(b[key], a[key]) <= 1e-5 and max_diff(c[key], a[key]) <= 1e-5, key


def test_local_layers_see_a_window_of_real_tokens():
    """The masks: a global layer sees every real token; a local one those within local_attention // 2."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    masks = encoder_masks(mask, window=2)
    assert masks["full_attention"].shape == masks["sliding_attention"].shape == (2, 1, 6, 6)
    assert masks["full_attention"][1, 0].tolist() == [[True, True, True, False, False, False]] * 6
    assert masks["sliding_attention"][0, 0, 0].tolist() == [True, True, True, False, False, False]
    assert masks["sliding_attention"][0, 0, 3].tolist() == [False, True, True, True, True, True]
    # A padding query past the window has no real key in it: it attends to every key instead (no empty row).
    assert masks["sliding_attention"][1, 0, 5].all()
    assert masks["sliding_attention"][1, 0, 4].tolist() == [False, False, True, False, False, False]


def test_the_window_changes_the_output(checkpoints, tmp_path):
    """Guards the parity test: with a window wider than the batch, the real tokens' states differ."""
    path = checkpoints("feature-extraction")
    raw = json.loads((path / "config.json").read_text())
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "config.json").write_text(json.dumps({**raw, "local_attention": 64}))
    (wide / "model.safetensors").symlink_to(path / "model.safetensors")
    batch = make_batch()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        a = from_pretrained(path)(**batch)["last_hidden_state"][real]
        b = from_pretrained(wide)(**batch)["last_hidden_state"][real]
        c = hf_model(wide, "feature-extraction", "sdpa")(**batch).last_hidden_state[real]
    assert (a - b).abs().max() > 100 * ATOL
    assert (b - c).abs().max() <= ATOL


def test_default_inputs(checkpoints):
    """No attention_mask: both sides attend to every token; mean pooling over all of them."""
    path = checkpoints("text-classification", "biased")
    hf, model = hf_model(path, "text-classification", "sdpa"), from_pretrained(path, task="text-classification")
    ids = make_batch()["input_ids"][:1]
    with torch.no_grad():
        assert max_diff(model(ids)["logits"], hf(input_ids=ids).logits) <= ATOL


def test_encoder_from_a_task_checkpoint(checkpoints):
    """feature-extraction over a task checkpoint reads the encoder nested under "model."."""
    path = checkpoints("fill-mask")
    hf = hf_model(path, "fill-mask", "sdpa")
    model = from_pretrained(path, task="feature-extraction")
    batch = make_batch()
    with torch.no_grad():
        got, want = model(**batch)["last_hidden_state"], hf.model(**batch).last_hidden_state
    assert max_diff(got, want, batch["attention_mask"].bool()) <= ATOL


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("task", list(TASKS))
def test_save_pretrained_loads_in_transformers(checkpoints, task, style, tmp_path):
    import transformers

    model = from_pretrained(checkpoints(task, style), task=task)
    model.save_pretrained(tmp_path)
    assert transformers.AutoConfig.from_pretrained(tmp_path).architectures == [TASKS[task]]
    theirs = hf_model(tmp_path, task, "sdpa")
    batch = make_batch(seed=1)
    with torch.no_grad():
        got, want = model(**batch), theirs(**batch)
    for key in OUTPUTS[task]:
        assert max_diff(got[key], want[key], batch["attention_mask"].bool()) <= ATOL, key
    # Back into kiln: the same model.
    again = from_pretrained(tmp_path, task=task)
    assert again.config == model.config
    with torch.no_grad():
        assert all(max_diff(again(**batch)[k], got[k]) == 0 for k in OUTPUTS[task])


NEW_KEYS = dict(layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})
OLD_KEYS = dict(global_attn_every_n_layers=2, global_rope_theta=1000.0, local_rope_theta=50.0)


def test_old_config_keys_read_as_the_new_ones(tmp_path):
    """Checkpoints on the hub spell the layer pattern and RoPE bases the older way; transformers 5 writes layer_types
    and rope_parameters. Both read the same, in kiln and in transformers, and the model computes the same."""
    import transformers

    sizes = {k: v for k, v in TINY.items() if not k.endswith("rope_theta")} | {"num_hidden_layers": 4}
    new = ModernBertConfig.from_dict({"model_type": "modernbert", **sizes, **NEW_KEYS})
    old = ModernBertConfig.from_dict({"model_type": "modernbert", **sizes, **OLD_KEYS})
    assert (old.layer_types, old.rope_theta) == (new.layer_types, new.rope_theta)
    assert new.layer_types == tuple(NEW_KEYS["layer_types"])
    assert new.rope_theta == {"full_attention": 1000.0, "sliding_attention": 50.0}
    theirs = transformers.ModernBertConfig.from_dict({**sizes, **OLD_KEYS})
    assert tuple(theirs.layer_types) == old.layer_types
    assert {t: p["rope_theta"] for t, p in theirs.rope_parameters.items()} == old.rope_theta
    # transformers' defaults when neither spelling is there: every third layer global, bases 160k and 10k.
    seven = sizes | {"num_hidden_layers": 7}
    bare = ModernBertConfig.from_dict({"model_type": "modernbert", **seven})
    assert bare.layer_types == tuple(transformers.ModernBertConfig(**seven).layer_types)
    assert bare.rope_theta == {"full_attention": 160_000.0, "sliding_attention": 10_000.0}
    # A config.json with the old keys only, as on the hub: the same numbers as transformers.
    path = make_modernbert(tmp_path / "new", num_hidden_layers=4, **OLD_KEYS)
    raw = json.loads((path / "config.json").read_text())
    raw = {k: v for k, v in raw.items() if k not in ("layer_types", "rope_parameters")} | OLD_KEYS
    (path / "config.json").write_text(json.dumps(raw))
    model = from_pretrained(path)
    assert model.config.layer_types == tuple(NEW_KEYS["layer_types"])
    batch = make_batch()
    with torch.no_grad():
        got = model(**batch)["last_hidden_state"]
        want = hf_model(path, "feature-extraction", "sdpa")(**batch).last_hidden_state
    assert max_diff(got, want, batch["attention_mask"].bool()) <= ATOL


@pytest.mark.parametrize("change, message", [
    ({"classifier_pooling": "max"}, "'classifier_pooling' 'max' is not supported; use one of"),
    ({"hidden_activation": "mish"}, "'hidden_activation' 'mish' is not supported"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE type 'linear'.*kiln implements 'default'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5.0}}, "'rope_parameters' must map full_attention"),
    ({"layer_types": ["full_attention", "local"]}, "'layer_types' must list one of full_attention, sliding_attention"),
    ({"layer_types": ["full_attention"]}, "'layer_types' lists 1 layers but 'num_hidden_layers' is 3"),
    ({"global_attn_every_n_layers": 0}, "'global_attn_every_n_layers' must be a positive integer"),
    ({"global_rope_theta": -1}, "'global_rope_theta' \\(full_attention layers\\) must be a positive number"),
    ({"hidden_size": 30}, "'hidden_size' \\(30\\) must be divisible by 'num_attention_heads' \\(4\\)"),
    ({"local_attention": 0}, "'local_attention' must be a positive integer"),
    ({"norm_bias": "yes"}, "'norm_bias' must be true or false"),
    ({"pad_token_id": 500}, "'pad_token_id' must be a token id below vocab_size"),
])
def test_bad_configs_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        ModernBertConfig.from_dict({"model_type": "modernbert", **TINY, **change})


def test_question_answering_needs_two_labels(tmp_path):
    path = make_modernbert(tmp_path, "token-classification", num_labels=3)
    with pytest.raises(ConfigError, match="Question answering needs 2 labels"):
        from_pretrained(path, task="question-answering")
