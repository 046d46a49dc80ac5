"""GGUF (llama.cpp) checkpoints: config, dequantized weights with llama.cpp's Q/K permutation undone, tokenizer, wiring
into kiln.hub / from_pretrained / export, and every bad-input path.

Tiny files are written here the way llama.cpp's convert_hf_to_gguf.py writes them (its tensor names from the gguf
package's own TensorNameMap, its Q/K permutation, 1-D tensors kept in F32), from tiny random transformers models.
The real files (SmolLM2-135M-Instruct, Gemma 3 270M) are checked in test_gguf_real.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from kiln import hub  # noqa: E402
from kiln.errors import CheckpointError  # noqa: E402
from kiln.graphs.checkpoint import from_pretrained  # noqa: E402

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, kiln runs fast!",
          "Paris is the capital of France", "a river runs through it", "I can't believe it's not butter",
          "what's up? we'll see 42 things"] * 3
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """A tiny trained byte-level BPE: tokens in id order (specials first) and merges as llama.cpp stores them."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=320, min_frequency=1, special_tokens=SPECIALS, show_progress=False)
    model = json.loads(bpe._tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def tiny_llama(vocab_size: int, tie: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms, so a swapped or mis-mapped norm weight shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, as llama.cpp applies it to q_proj / k_proj."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, qtype=gguf.GGMLQuantizationType.F32, arch: str = "llama", pre: str | None = "gpt2",
               tokens=None, merges=None, overrides: dict | None = None, add_bos: bool = False,
               token_types=None, scores=None, special_ids=None) -> Path:
    """Write ``model`` as llama.cpp's converter would; ``overrides`` maps a GGUF tensor name to a raw array to store."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    if arch in ("qwen3", "gemma2", "gemma3"):  # convert_hf_to_gguf.py writes the config's head_dim
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch.startswith("gemma"):
        writer.add_sliding_window(c.sliding_window)
    if arch == "phi3":  # convert_hf_to_gguf.py Phi3MiniModel: the rotated width, LongRoPE's factors as tensors
        rope = c.rope_parameters
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        if rope.get("rope_type") == "longrope":
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            writer.add_rope_scaling_attn_factors(model.model.rotary_emb.attention_scaling)
            writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
            writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    if tokens is not None and merges is None:  # a SentencePiece vocabulary as Gemma's: types given, no merges
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores if scores is not None else [0.0] * len(tokens))
        writer.add_token_types(token_types)
        ids = special_ids or {"bos": 2, "eos": 1, "pad": 0, "unk": 3}  # Gemma's layout by default
        writer.add_bos_token_id(ids["bos"])
        writer.add_eos_token_id(ids["eos"])
        if "pad" in ids:
            writer.add_pad_token_id(ids["pad"])
        writer.add_unk_token_id(ids["unk"])
        writer.add_add_bos_token(True)
    elif tokens is not None:
        writer.add_tokenizer_model("gpt2")
        if pre:
            writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3: CONTROL
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_pad_token_id(2)
        writer.add_add_bos_token(add_bos)
        writer.add_chat_template(TEMPLATE)
    # tensor names as the model's own architecture has them (a Llama written as "bloom" tests the refusal)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()) if arch.startswith(("qwen", "gemma", "phi"))
                                     else gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for hf, tensor in model.state_dict().items():
        if hf == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp stores a tied head once, as token_embd
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        data = tensor.float().numpy()
        if hf.endswith("q_proj.weight") and arch == "llama":  # the converter permutes q/k for llama only
            data = llama_cpp_permute(data, c.num_attention_heads)
        elif hf.endswith("k_proj.weight") and arch == "llama":
            data = llama_cpp_permute(data, c.num_key_value_heads)
        if hf.endswith("norm.weight") and arch.startswith("gemma"):  # the converter stores Gemma's 1 + weight
            data = data + 1
        if name in (overrides or {}):
            writer.add_tensor(name, overrides[name])
        elif data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(data))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def roundtrip(model, qtype):
    """``model`` with every 2-D weight replaced by what ``qtype`` stores: the exact oracle for a quantized file."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qtype), qtype)))
    return model


IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 250], [7, 7, 120, 64, 33, 2, 11]])


@pytest.fixture(scope="module")
def vocab():
    return byte_level_vocab()


def test_f32_file_matches_transformers_and_undoes_the_permutation(tmp_path, vocab):
    tokens, merges = vocab
    hf = tiny_llama(len(tokens), tie=False)
    path = write_gguf(tmp_path / "tiny-f32.gguf", hf, tokens=tokens, merges=merges)

    config = hub.read_config(hub.resolve(path))
    assert config["model_type"] == "llama" and not config["tie_word_embeddings"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (2, 32, 4, 2, len(tokens))
    assert config["rms_norm_eps"] == 1e-5 and (config["bos_token_id"], config["eos_token_id"]) == (1, 2)

    raw = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
    q = hf.model.layers[0].self_attn.q_proj.weight.detach()
    assert not np.array_equal(raw.data, q.numpy())  # the file really holds llama.cpp's row order
    kiln_model = from_pretrained(path, task="text-generation")
    assert torch.equal(kiln_model.layers[0].attn.q.weight, q)
    assert torch.equal(kiln_model.layers[1].attn.k.weight, hf.model.layers[1].self_attn.k_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(kiln_model(IDS)["logits"], hf(IDS).logits, atol=1e-4, rtol=0)


def tiny_qwen(model_type: str, vocab_size: int, head_dim: int, seed: int = 0):
    """A tiny random transformers Qwen2/Qwen3 causal LM with random norms (Qwen3's q/k norms among them)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=128,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("arch, head_dim", [("qwen2", 8), ("qwen3", 16)])
def test_qwen_files_match_transformers(tmp_path, vocab, arch, head_dim):
    """Qwen2/Qwen3 GGUFs: no q/k permutation to undo, Qwen3's per-head norms and its own head width read."""
    tokens, merges = vocab
    hf = tiny_qwen(arch, len(tokens), head_dim)
    path = write_gguf(tmp_path / f"{arch}.gguf", hf, arch=arch, pre="qwen2", tokens=tokens, merges=merges)
    config = hub.read_config(hub.resolve(path))
    assert (config["model_type"], config["architectures"], config["head_dim"]) == \
        (arch, [type(hf).__name__], head_dim)
    ours = from_pretrained(path, task="text-generation")
    assert torch.equal(ours.layers[0].attn.q.weight, hf.model.layers[0].self_attn.q_proj.weight)
    if arch == "qwen3":
        assert torch.equal(ours.layers[1].attn.k_norm.weight, hf.model.layers[1].self_attn.k_norm.weight)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS)["logits"], hf(IDS).logits, atol=1e-4, rtol=0)


def test_qwen3_q8_0_file_gives_transformers_gguf_tokens(tmp_path, vocab):
    """The same Q8_0 file through transformers' own GGUF loader (config and tensors from the file): equal logits and
    greedy tokens. Its Qwen3 mapping drops the head width, so the file uses transformers' default, 128."""
    from transformers import Qwen3ForCausalLM

    tokens, merges = vocab
    path = write_gguf(tmp_path / "qwen3-q8.gguf", tiny_qwen("qwen3", len(tokens), 128, seed=2), arch="qwen3",
                      qtype=gguf.GGMLQuantizationType.Q8_0, pre="qwen2", tokens=tokens, merges=merges)
    theirs = transformers_from_gguf(Qwen3ForCausalLM, path)
    ours = from_pretrained(path, task="text-generation")
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS[:1])["logits"], theirs(IDS[:1]).logits, atol=1e-4, rtol=0)
        expected = theirs.generate(IDS[:1], max_new_tokens=8, do_sample=False, eos_token_id=None)[0, 7:].tolist()
    assert greedy(ours, IDS[:1], 8) == expected


def tiny_gemma3(vocab_size: int, seed: int = 0):
    """A tiny random transformers Gemma 3 (every other layer local, a 4-token window) with random norms."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128, query_pre_attn_scalar=256,
        sliding_window=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    return model


def test_gemma3_q8_0_file_gives_transformers_gguf_tokens(tmp_path, vocab):
    """A Gemma 3 GGUF as llama.cpp writes it (norm weights + 1, the window in the metadata, the layer pattern and
    local RoPE base left out) through kiln and through transformers' own GGUF loader: equal logits and greedy tokens
    past the window."""
    from transformers import Gemma3ForCausalLM

    tokens, merges = vocab
    hf = tiny_gemma3(len(tokens), seed=3)
    path = write_gguf(tmp_path / "gemma3-q8.gguf", hf, arch="gemma3", qtype=gguf.GGMLQuantizationType.Q8_0,
                      tokens=tokens, merges=merges)
    config = hub.read_config(hub.resolve(path))
    assert (config["model_type"], config["head_dim"], config["sliding_window"]) == ("gemma3_text", 16, 4)
    assert "query_pre_attn_scalar" not in config and "layer_types" not in config  # the file has neither
    theirs = transformers_from_gguf(Gemma3ForCausalLM, path)
    ours = from_pretrained(path, task="text-generation")
    assert ours.config.layer_types == tuple(theirs.config.layer_types)  # the pattern both fill in: 5 local, 1 global
    torch.testing.assert_close(ours.layers[0].post_attn_norm.weight, hf.model.layers[0].post_attention_layernorm.weight,
                               atol=1e-6, rtol=0)  # the + 1 undone
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS[:1])["logits"], theirs(IDS[:1]).logits, atol=1e-4, rtol=0)
        expected = theirs.generate(IDS[:1], max_new_tokens=8, do_sample=False, eos_token_id=None)[0, 7:].tolist()
    assert greedy(ours, IDS[:1], 8) == expected


def gemma_vocab() -> tuple[list[str], list[int]]:
    """A tiny SentencePiece-style vocabulary laid out as Gemma's: specials, then byte tokens, then pieces spelled with
    '▁' for spaces (trained here), a run of spaces stored as spaces, a user-defined newline run."""
    from tokenizers import SentencePieceBPETokenizer

    bpe = SentencePieceBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, show_progress=False)
    pieces = [t for t, _ in sorted(json.loads(bpe._tokenizer.to_str())["model"]["vocab"].items(), key=lambda kv: kv[1])]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = specials + byte_tokens + ["  ", "   "] + ["\n\n"] + [p for p in pieces if p not in ("  ", "   ")]
    types = [3] * len(specials) + [6] * 256 + [1, 1, 4] + [1] * (len(tokens) - len(specials) - 259)
    return tokens, types


def test_gemma_tokenizer_encodes_like_transformers(tmp_path):
    """Gemma's SentencePiece vocabulary (no merges in the file; spaces stored as spaces; byte fallback) rebuilt by
    kiln encodes and decodes as transformers' GGUF tokenizer does."""
    from transformers import AutoTokenizer

    from kiln.hub import gguf as kiln_gguf

    tokens, types = gemma_vocab()
    path = write_gguf(tmp_path / "gemma-tok.gguf", tiny_gemma3(len(tokens)), arch="gemma3", tokens=tokens,
                      token_types=types)
    ours, theirs = kiln_gguf.build_tokenizer(path), AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["the quick brown fox", "  two  spaces   three", "Paris\n\nis 42 ✓ café",
                 "<start_of_turn>user\nhello<end_of_turn>", "zebra? QQQ"]:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True), text
    assert ours.encode("the").ids[0] == 2  # <bos>, as llama.cpp and transformers put it first
    assert kiln_gguf.tokenizer_config(path)["add_bos_token"] is True


def sentencepiece_vocab() -> tuple[list[str], list[int], list[float]]:
    """A tiny SentencePiece BPE vocabulary laid out as Llama 2's and Phi-3's: <unk> <s> </s>, byte tokens, pieces
    spelled with '▁' scored best first (trained here), a control token and a user-defined one."""
    from tokenizers import SentencePieceBPETokenizer

    bpe = SentencePieceBPETokenizer(add_prefix_space=True)
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, show_progress=False)
    pieces = [t for t, _ in sorted(json.loads(bpe._tokenizer.to_str())["model"]["vocab"].items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|end|>", "<|user|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0, 0.0]
    return tokens, types, scores


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_sentencepiece_tokenizers_encode_like_transformers(tmp_path, arch):
    """Llama 2's and Phi-3's SentencePiece BPE (merges recovered from the scores, byte fallback, '▁' put before the
    text: by the pre-tokenizer, or for Phi-3 by a normalizer, which adds one more before a leading space) rebuilt by
    kiln encodes and decodes as transformers' GGUF tokenizer does."""
    from transformers import AutoTokenizer

    from kiln.hub import gguf as kiln_gguf

    tokens, types, scores = sentencepiece_vocab()
    model = tiny_phi3(len(tokens)) if arch == "phi3" else tiny_llama(len(tokens), tie=False)
    path = write_gguf(tmp_path / f"{arch}-tok.gguf", model, arch=arch, tokens=tokens, token_types=types,
                      scores=scores, special_ids={"bos": 1, "eos": 2, "unk": 0})
    ours, theirs = kiln_gguf.build_tokenizer(path), AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["the quick brown fox", "  two  spaces   three", " leading space", "Paris\n\nis 42 ✓ café",
                 "<|user|>hello<|end|>", "zebra? QQQ"]:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True), text
    assert ours.encode("the").ids[0] == 1  # <s>
    with pytest.raises(CheckpointError, match="needs one score per token"):
        kiln_gguf.build_tokenizer(write_gguf(tmp_path / "bad.gguf", model, arch=arch, tokens=tokens,
                                             token_types=types, scores=scores[:-1],
                                             special_ids={"bos": 1, "eos": 2, "unk": 0}))


def tiny_phi3(vocab_size: int, seed: int = 0, **rope):
    import transformers

    torch.manual_seed(seed)
    config = transformers.Phi3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0, **rope)
    model = transformers.Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


LONGROPE = dict(original_max_position_embeddings=8, partial_rotary_factor=0.5,
                rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.25], "long_factor": [2.0, 4.5]})


@pytest.mark.parametrize("rope", [{}, LONGROPE], ids=["phi3", "phi4-longrope-partial"])
def test_phi3_files_match_the_original_model(tmp_path, vocab, rope):
    """Phi-3 GGUFs as llama.cpp writes them: fused q/k/v and gate/up kept, the rotated width and LongRoPE's factor
    tensors. kiln gives the original transformers model's logits and greedy tokens past the original context (the
    oracle: transformers' own GGUF loader drops LongRoPE), and without LongRoPE what that loader gives."""
    from transformers import AutoConfig, Phi3ForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tokens, merges = vocab
    hf = tiny_phi3(len(tokens), seed=4, **rope)
    path = write_gguf(tmp_path / "phi3.gguf", hf, arch="phi3", tokens=tokens, merges=merges)
    config = hub.read_config(hub.resolve(path))
    assert config["model_type"] == "phi3" and config["head_dim"] == 8
    ours = from_pretrained(path, task="text-generation")
    assert ours.config.rotary_dim == (4 if rope else 8) and ours.config.rope["rope_type"] == ("longrope" if rope else "default")
    ids = IDS[:1, :6]
    with torch.no_grad():
        longer = torch.cat([IDS, IDS[:, :5]], 1)  # 12 positions: past the original context, the long factors
        for x in (IDS, longer):
            torch.testing.assert_close(ours(x)["logits"], hf(x).logits, atol=1e-4, rtol=0)
        expected = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)[0, 6:].tolist()
        out, generated = ours(ids), []
        seq, past = ids, out["present_key_values"]
        for _ in range(8):  # the kiln loop, with transformers' one rerun as the sequence passes the original context
            next_id = out["logits"][:, -1].argmax(-1, keepdim=True)
            generated.append(int(next_id))
            seq = torch.cat([seq, next_id], 1)
            rerun = seq.shape[1] == (ours.config.recompute_cache_at or -1) + 1
            out = ours(seq) if rerun else ours(next_id, past_key_values=past)
            past = out["present_key_values"]
    assert generated == expected
    if not rope:
        theirs = Phi3ForCausalLM(AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)).eval()
        theirs.load_state_dict(load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=theirs)["tensors"])
        with torch.no_grad():
            torch.testing.assert_close(ours(IDS)["logits"], theirs(IDS).logits, atol=1e-4, rtol=0)


def transformers_from_gguf(model_class, path: Path):
    """transformers' own reading of a GGUF file (config, then load_gguf_checkpoint's tensors), as its
    from_pretrained(gguf_file=...) does without needing accelerate; the head tied to the embedding."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    theirs = model_class(AutoConfig.from_pretrained(path.parent, gguf_file=path.name)).eval()
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=theirs)["tensors"]
    assert theirs.load_state_dict(state, strict=False).missing_keys == ["lm_head.weight"]  # tied
    theirs.tie_weights()
    return theirs


def greedy(model, ids: torch.Tensor, steps: int) -> list[int]:
    """``steps`` greedy tokens from a kiln reference, one at a time over its KV cache."""
    with torch.no_grad():
        out = model(ids)
        generated, past, next_id = [], out["present_key_values"], out["logits"][:, -1].argmax(-1)
        for _ in range(steps):
            generated.append(int(next_id))
            step = model(next_id[:, None], past_key_values=past)
            past, next_id = step["present_key_values"], step["logits"][:, -1].argmax(-1)
    return generated


def test_q8_0_file_matches_the_dequantized_reference(tmp_path, vocab):
    tokens, _ = vocab
    hf = tiny_llama(len(tokens), tie=True, seed=1)
    with torch.no_grad():
        exact = hf(IDS).logits
    q8 = gguf.GGMLQuantizationType.Q8_0
    path = write_gguf(tmp_path / "tiny-q8.gguf", hf, qtype=q8)
    assert gguf.GGUFReader(path).tensors[0].tensor_type == q8
    kiln_model = from_pretrained(path, task="text-generation")
    assert kiln_model.config.tie_word_embeddings and kiln_model.lm_head is None
    with torch.no_grad():
        logits = kiln_model(IDS)["logits"]
        torch.testing.assert_close(logits, roundtrip(hf, q8)(IDS).logits, atol=1e-4, rtol=0)
    assert (logits - exact).abs().max() < 0.05  # and Q8_0 itself stays close to the float weights


@pytest.mark.parametrize("pre, add_bos", [("gpt2", False), ("llama-bpe", True), ("qwen2", False)])
def test_tokenizer_encodes_like_transformers(tmp_path, vocab, pre, add_bos):
    from transformers import AutoTokenizer

    from kiln.hub import gguf as kiln_gguf

    tokens, merges = vocab
    path = write_gguf(tmp_path / "tok.gguf", tiny_llama(len(tokens), tie=True), pre=pre, tokens=tokens, merges=merges,
                      add_bos=add_bos)
    ours = kiln_gguf.build_tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    for text in [*CORPUS[:6], "  leading spaces\n\nand lines", "<|im_start|>user\nhi<|im_end|>", "Ünïcode ✓ 12345"]:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == "<|im_start|>" * add_bos + text


def test_export_writes_the_derived_config_and_tokenizer(tmp_path, vocab):
    import kiln
    from kiln.runtime.tokenizer import Tokenizer

    tokens, merges = vocab
    (tmp_path / "src").mkdir()
    path = write_gguf(tmp_path / "src" / "model.gguf", tiny_llama(len(tokens), tie=True), tokens=tokens, merges=merges)
    manifest = kiln.export(tmp_path / "src", tmp_path / "out", task="text-generation", seq="1:32")
    assert manifest["validation"]["passed"] and manifest["source"]["weight_files"] == ["model.gguf"]
    assert manifest["source"]["path"] == str((tmp_path / "src").resolve())
    assert manifest["preprocessing_files"] == ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == hub.read_config(path)
    tok_config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == TEMPLATE and tok_config["eos_token"] == "<|im_end|>"
    tokenizer = Tokenizer.from_dir(tmp_path / "out")
    assert tokenizer.special_tokens["bos_token"] == "<|im_start|>"


def test_resolve_gguf_directories(tmp_path, vocab):
    model = tiny_llama(len(vocab[0]), tie=True)
    one = tmp_path / "one"
    one.mkdir()
    write_gguf(one / "a.gguf", model)
    checkpoint = hub.resolve(one)
    assert checkpoint.origin == ((one / "a.gguf").resolve(),) and checkpoint.weight_format == "gguf"
    assert checkpoint.source_files == checkpoint.origin and checkpoint.source_dir == one.resolve()
    # converted once into a Hugging Face style directory that nothing downstream tells from any other (this file
    # has no vocabulary, so no tokenizer and no special token ids)
    assert sorted(p.name for p in checkpoint.path.iterdir()) == ["config.json", "model.safetensors"]
    assert checkpoint.weight_files == (checkpoint.path / "model.safetensors",)
    assert hub.resolve(one / "a.gguf").path == checkpoint.path  # the same file: the same conversion, reused
    write_gguf(one / "b.gguf", model)
    with pytest.raises(CheckpointError, match="2 GGUF files .*give the path"):
        hub.resolve(one)
    (one / "config.json").write_text(json.dumps({"model_type": "llama"}))  # a HF checkpoint beside: it wins
    with pytest.raises(CheckpointError, match="No weights"):
        hub.resolve(one)


def test_bad_files_name_the_problem(tmp_path, vocab):
    model = tiny_llama(len(vocab[0]), tie=True)
    good = write_gguf(tmp_path / "good.gguf", model).read_bytes()

    (tmp_path / "cut.gguf").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="cut.gguf is a GGUF file that cannot be parsed.*truncated"):
        hub.resolve(tmp_path / "cut.gguf")
    (tmp_path / "header.gguf").write_bytes(good[:200])
    with pytest.raises(CheckpointError, match="cannot be parsed"):
        from_pretrained(tmp_path / "header.gguf", task="text-generation")

    (tmp_path / "text.gguf").write_text("not a model at all")
    with pytest.raises(CheckpointError, match="text.gguf is not a GGUF file: it starts with b'not '"):
        hub.resolve(tmp_path / "text.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        hub.resolve(tmp_path / "empty.gguf")

    write_gguf(tmp_path / "bloom.gguf", model, arch="bloom")
    with pytest.raises(CheckpointError, match="architecture 'bloom'.*'qwen3', 'gemma2', 'gemma3', 'phi3' only"):
        hub.resolve(tmp_path / "bloom.gguf")

    int8 = np.ones(32, dtype=np.int8)  # a tensor type gguf cannot dequantize
    write_gguf(tmp_path / "int8.gguf", model, overrides={"blk.1.ffn_norm.weight": int8})
    with pytest.raises(CheckpointError, match="'blk.1.ffn_norm.weight' in int8.gguf is stored as I8"):
        from_pretrained(tmp_path / "int8.gguf", task="text-generation")
