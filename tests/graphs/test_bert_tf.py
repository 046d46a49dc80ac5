"""The keras (TensorFlow) BERT-family sibling against the PyTorch reference: every family and head on tiny random
checkpoints, padded batches with hidden states and attentions, the real all-MiniLM-L6-v2 weights, and save_pretrained
back to torch and transformers."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("the TensorFlow reference needs tensorflow: pip install 'kiln[tf]'", allow_module_level=True)

# Before anything else imports TensorFlow: kiln's TensorFlow modules load triton first, which torch imports later
# and which aborts the process when TensorFlow came first (see kiln/graphs/bert/model_tf.py).
from kiln.graphs.bert import model_tf, model_torch  # noqa: E402, I001

import torch  # noqa: E402
import transformers  # noqa: E402

from conftest import AUTO_CLASSES, make_checkpoint  # noqa: E402
from kiln.graphs.checkpoint import from_pretrained  # noqa: E402

ATOL = 1e-5
TASKS = ["feature-extraction", "text-classification", "token-classification", "question-answering", "fill-mask"]


def padded_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of lengths 11, 7 and 3, right-padded with pad_token_id as a tokenizer pads (RoBERTa's positions depend
    on it), with a second segment in BERT's token types."""
    rng = np.random.default_rng(seed)
    lengths = np.array([11, 7, 3])
    mask = (np.arange(11)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(5, config.vocab_size, size=mask.shape), config.pad_token_id)
    batch = {"input_ids": ids.astype(np.int64), "attention_mask": mask}
    if config.type_vocab_size > 1:
        batch["token_type_ids"] = (np.arange(11)[None, :] >= lengths[:, None] // 2).astype(np.int64) * mask
    return batch


def run_both(path, task: str, batch: dict, **flags):
    """(TensorFlow outputs, torch outputs) as NumPy, same keys in the same order, with both references."""
    ours, torch_model = from_pretrained(path, task, framework="tf"), from_pretrained(path, task)
    with torch.no_grad():
        want = torch_model(**{k: torch.from_numpy(v) for k, v in batch.items()}, **flags)
    got = ours(**batch, **flags)
    assert list(got) == list(want)
    return ours, torch_model, as_numpy(got), as_numpy(want)


def as_numpy(out: dict) -> dict:
    return {k: [x.numpy() for x in v] if isinstance(v, tuple) else v.numpy() for k, v in out.items()}


def assert_close(got: dict, want: dict, what: str, rows=None, atol: float = ATOL) -> None:
    """Every output within atol; ``rows`` (a boolean (B, T) mask) restricts per-token outputs to those tokens."""
    for key in want:
        pairs = zip(got[key], want[key]) if isinstance(want[key], list) else [(got[key], want[key])]
        for i, (a, b) in enumerate(pairs):
            assert a.shape == b.shape, f"{what} {key}[{i}]: shape {a.shape} vs {b.shape}"
            if rows is not None and key != "pooler_output" and a.ndim >= 2:
                a, b = (x.swapaxes(1, 2)[rows] if key == "attentions" else x[rows] for x in (a, b))  # query rows
            diff = float(np.abs(a - b).max())
            assert diff <= atol, f"{what} {key}[{i}]: max |tf - torch| = {diff:.3g} > {atol}"
            assert b.std() > 0  # the output depends on the input, not a constant


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("task", TASKS)
def test_every_head_matches_torch_with_hidden_states_and_attentions(family, task, checkpoints):
    path, _ = checkpoints(family, task)
    batch = padded_batch(from_pretrained(path, task).config)
    ours, torch_model, got, want = run_both(path, task, batch, output_hidden_states=True, output_attentions=True)
    assert ours.task == task
    # The same names, order and PyTorch layouts as torch's state_dict, so one weights.py serves both.
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in torch_model.state_dict().items()]
    assert len(got["hidden_states"]) == ours.config.num_hidden_layers + 1
    assert_close(got, want, f"{family}/{task}")


@pytest.mark.parametrize("model_type,task,overrides", [
    ("xlm-roberta", "fill-mask", {}),  # position offset, exact GELU in the head
    ("bert", "token-classification", {"hidden_act": "gelu_new"}),  # tanh approximation
    ("distilbert", "feature-extraction", {"activation": "relu"}),
])
def test_family_variants_and_activations(model_type, task, overrides, tmp_path):
    # Larger weights put the activations' inputs in +-3, where exact GELU and its tanh approximation differ: swapping
    # them moves the outputs by 4e-4 or more here, while at the default initializer_range (0.02) by less than 1e-5.
    path, _ = make_checkpoint(tmp_path, model_type, task, initializer_range=0.2, **overrides)
    batch = padded_batch(from_pretrained(path, task).config, seed=1)
    _, torch_model, got, want = run_both(path, task, batch)
    assert torch_model.config.hidden_act == overrides.get("hidden_act", overrides.get("activation", "gelu"))
    assert_close(got, want, f"{model_type}/{task} {overrides}")


def test_weights_exist_before_the_first_call(checkpoints):
    config = from_pretrained(checkpoints("roberta", "fill-mask")[0], "fill-mask").config
    ours, theirs = model_tf.BertForMaskedLM(config), model_torch.BertForMaskedLM(config)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in theirs.state_dict().items()]
    assert model_tf.BertModel(config, add_pooler=False).pooler is None


def test_real_minilm_matches_torch(minilm_dir):
    """Real weights at 1e-5 at the tokens that count. Padded positions are left out: their float32 values are
    ill-conditioned in MiniLM's upper layers, where torch itself (SDPA or eager) lands up to 7e-5 from a float64 run,
    and TensorFlow as close to float64 as torch is."""
    from kiln.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(minilm_dir)
    enc = tokenizer(["A man is eating food.", "Two men pushed carts through the woods by the river.", "Hi"])
    batch = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.token_type_ids}
    flags = {"output_hidden_states": True, "output_attentions": True}
    _, _, got, want = run_both(minilm_dir, "feature-extraction", batch, **flags)
    assert_close(got, want, "all-MiniLM-L6-v2", rows=enc.attention_mask.astype(bool))


@pytest.mark.parametrize("family,task", [("bert", "fill-mask"), ("roberta", "text-classification"),
                                         ("distilbert", "question-answering")])
def test_save_pretrained_loads_back_in_torch_and_transformers(family, task, checkpoints, tmp_path):
    path, _ = checkpoints(family, task)
    ours = from_pretrained(path, task, framework="tf")
    ours.save_pretrained(tmp_path)
    batch = padded_batch(ours.config, seed=2)
    got = {k: v.numpy() for k, v in ours(**batch).items()}
    back = from_pretrained(tmp_path, task)
    theirs = getattr(transformers, AUTO_CLASSES[task]).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        for model in (back, theirs):
            out = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
            for key, value in got.items():
                np.testing.assert_allclose(out[key].numpy(), value, atol=ATOL, rtol=0, err_msg=f"{type(model)} {key}")
