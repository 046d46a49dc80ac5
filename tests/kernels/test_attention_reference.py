"""Check the NumPy attention spec against torch's SDPA as an independent oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kiln.kernels.attention.reference import attention

ATOL = 1e-5


def rand(*shape: int, seed: int = 0, dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def qkv(B=2, H=4, Hkv=4, T=6, S=6, D=32, Dv=None, seed=0):
    return rand(B, H, T, D, seed=seed), rand(B, Hkv, S, D, seed=seed + 1), rand(B, Hkv, S, Dv or D, seed=seed + 2)


def sdpa(q, k, v, *, attn_mask=None, is_causal=False, scale=None) -> np.ndarray:
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    mask = None if attn_mask is None else t(attn_mask)
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(
        t(q), t(k), t(v), attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )
    return out.numpy()


def causal_mask(T: int, S: int) -> np.ndarray:
    """Bottom-right causal mask built with torch.tril, independently of the spec."""
    return torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T).numpy()


def test_plain() -> None:
    q, k, v = qkv()
    res = attention(q, k, v)
    np.testing.assert_allclose(res.out, sdpa(q, k, v), atol=ATOL)
    assert res.out.dtype == np.float32 and res.probs is None
    assert res.present_key is k and res.present_value is v


def test_scale_override() -> None:
    q, k, v = qkv(T=5, S=9)
    np.testing.assert_allclose(attention(q, k, v, scale=0.3).out, sdpa(q, k, v, scale=0.3), atol=ATOL)


def test_value_head_dim_may_differ() -> None:
    q, k, v = qkv(D=32, Dv=48)
    res = attention(q, k, v)
    assert res.out.shape == (2, 4, 6, 48)
    np.testing.assert_allclose(res.out, sdpa(q, k, v), atol=ATOL)


@pytest.mark.parametrize("kind", ["bool", "int", "float01"])
def test_key_padding_mask(kind: str) -> None:
    q, k, v = qkv(B=3, T=5, S=8)
    pad = np.ones((3, 8), dtype=bool)
    pad[1, 5:] = False  # batch row 1 is padded after 5 keys
    pad[2, :2] = False  # batch row 2 is left-padded
    mask = {"bool": pad, "int": pad.astype(np.int64), "float01": pad.astype(np.float32)}[kind]
    expected = sdpa(q, k, v, attn_mask=pad[:, None, None, :])
    np.testing.assert_allclose(attention(q, k, v, mask=mask).out, expected, atol=ATOL)


@pytest.mark.parametrize("shape", [(3, 1, 1, 8), (3, 4, 5, 8), (1, 1, 5, 8)])
def test_broadcast_bool_and_additive_masks(shape: tuple[int, ...]) -> None:
    q, k, v = qkv(B=3, T=5, S=8)
    keep = np.random.default_rng(7).random(shape) > 0.3
    keep[..., 0] = True  # keep at least one key per row so torch has no NaN
    additive = np.where(keep, np.random.default_rng(8).standard_normal(shape), -np.inf).astype(np.float32)
    np.testing.assert_allclose(attention(q, k, v, mask=keep).out, sdpa(q, k, v, attn_mask=keep), atol=ATOL)
    np.testing.assert_allclose(
        attention(q, k, v, mask=additive).out, sdpa(q, k, v, attn_mask=additive), atol=ATOL
    )


def test_causal_square() -> None:
    q, k, v = qkv(T=7, S=7)
    np.testing.assert_allclose(attention(q, k, v, causal=True).out, sdpa(q, k, v, is_causal=True), atol=ATOL)


@pytest.mark.parametrize("T", [1, 3])
def test_causal_decode_over_past(T: int) -> None:
    P = 5
    q, k, v = qkv(T=T, S=T)
    pk, pv = rand(2, 4, P, 32, seed=10), rand(2, 4, P, 32, seed=11)
    res = attention(q, k, v, causal=True, past_key=pk, past_value=pv)
    full_k, full_v = np.concatenate([pk, k], axis=2), np.concatenate([pv, v], axis=2)
    expected = sdpa(q, full_k, full_v, attn_mask=causal_mask(T, P + T))
    np.testing.assert_allclose(res.out, expected, atol=ATOL)


@pytest.mark.parametrize("Hkv", [8, 4, 2, 1])  # ratios 1, 2, 4 and MQA
@pytest.mark.parametrize("causal", [False, True])
def test_gqa(Hkv: int, causal: bool) -> None:
    q, k, v = qkv(H=8, Hkv=Hkv, T=6, S=6)
    res = attention(q, k, v, causal=causal)
    np.testing.assert_allclose(res.out, sdpa(q, k, v, is_causal=causal), atol=ATOL)
    # Same thing spelled out: head h reads kv head h // (H // Hkv).
    rep = 8 // Hkv
    mha = attention(q, np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1), causal=causal)
    np.testing.assert_allclose(res.out, mha.out, atol=ATOL)


def test_past_kv_concatenation() -> None:
    q, k, v = qkv(Hkv=2, T=2, S=2)
    pk, pv = rand(2, 2, 4, 32, seed=20), rand(2, 2, 4, 32, seed=21)
    res = attention(q, k, v, past_key=pk, past_value=pv)
    np.testing.assert_array_equal(res.present_key, np.concatenate([pk, k], axis=2))
    np.testing.assert_array_equal(res.present_value, np.concatenate([pv, v], axis=2))
    expected = sdpa(q, res.present_key, res.present_value)
    np.testing.assert_allclose(res.out, expected, atol=ATOL)


def test_kv_cache_consistency() -> None:
    N, n_tail = 10, 3
    q, k, v = qkv(H=4, Hkv=2, T=N, S=N)
    full = attention(q, k, v, causal=True)
    pre = attention(q[:, :, :-n_tail], k[:, :, :-n_tail], v[:, :, :-n_tail], causal=True)
    np.testing.assert_allclose(pre.out, full.out[:, :, :-n_tail], atol=ATOL)
    pk, pv = pre.present_key, pre.present_value
    for i in range(N - n_tail, N):
        step = attention(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1],
                         causal=True, past_key=pk, past_value=pv)
        np.testing.assert_allclose(step.out, full.out[:, :, i : i + 1], atol=ATOL)
        pk, pv = step.present_key, step.present_value
    np.testing.assert_array_equal(pk, k)
    np.testing.assert_array_equal(pv, v)


def test_return_probs() -> None:
    q, k, v = qkv(T=5, S=8)
    pad = np.ones((2, 8), dtype=bool)
    pad[0, 6:] = False
    res = attention(q, k, v, mask=pad, causal=True, return_probs=True)
    allowed = pad[:, None, None, :] & causal_mask(5, 8)
    assert res.probs.shape == (2, 4, 5, 8) and res.probs.dtype == np.float32
    np.testing.assert_allclose(res.probs.sum(-1), 1.0, atol=ATOL)
    assert (np.broadcast_to(~allowed, res.probs.shape) <= (res.probs == 0)).all()  # masked -> exactly 0
    assert (res.probs[np.broadcast_to(allowed, res.probs.shape)] > 0).all()
    np.testing.assert_allclose(res.probs @ v, res.out, atol=ATOL)
    np.testing.assert_allclose(res.out, sdpa(q, k, v, attn_mask=allowed), atol=ATOL)


def test_float16_input() -> None:
    q, k, v = (a.astype(np.float16) for a in qkv(T=7, S=9, D=64))
    res = attention(q, k, v, causal=True)
    assert res.out.dtype == np.float16
    ref32 = attention(*(a.astype(np.float32) for a in (q, k, v)), causal=True).out
    np.testing.assert_allclose(res.out.astype(np.float32), ref32, atol=1e-2)


def test_float64_input_computes_in_float64() -> None:
    q, k, v = (a.astype(np.float64) for a in qkv())
    res = attention(q, k, v, return_probs=True)
    assert res.out.dtype == np.float64 and res.probs.dtype == np.float64
    np.testing.assert_allclose(res.out, sdpa(q, k, v), atol=1e-12)


@pytest.mark.parametrize("T", [1, 7, 13])
@pytest.mark.parametrize("D", [32, 64, 128])
def test_odd_lengths_and_head_dims(T: int, D: int) -> None:
    q, k, v = qkv(B=1, H=2, Hkv=2, T=T, S=T + 4, D=D, seed=T * D)
    np.testing.assert_allclose(attention(q, k, v).out, sdpa(q, k, v), atol=ATOL)
    expected = sdpa(q, k, v, attn_mask=causal_mask(T, T + 4))
    np.testing.assert_allclose(attention(q, k, v, causal=True).out, expected, atol=ATOL)


def test_fully_masked_rows_give_zeros_not_nan() -> None:
    q, k, v = qkv(B=2, T=4, S=6)
    pad = np.ones((2, 6), dtype=bool)
    pad[1] = False  # batch row 1: every key is padding
    res = attention(q, k, v, mask=pad, return_probs=True)
    assert np.isfinite(res.out).all() and np.isfinite(res.probs).all()
    assert (res.out[1] == 0).all() and (res.probs[1] == 0).all()
    # Valid rows still agree with torch. Fully masked rows are backend-defined
    # (NaN, zeros or a uniform average depending on backend/version), so skip them.
    expected = sdpa(q, k, v, attn_mask=pad[:, None, None, :])
    np.testing.assert_allclose(res.out[0], expected[0], atol=ATOL)
    # Additive -inf rows follow the same rule; causal with T > S leaves early rows empty.
    additive = np.zeros((1, 1, 4, 6), np.float32)
    additive[..., 2, :] = -np.inf
    assert (attention(q, k, v, mask=additive).out[:, :, 2] == 0).all()
    assert (attention(q, k[:, :, :2], v[:, :, :2], causal=True).out[:, :, :2] == 0).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(H=6, Hkv=4), r"multiple of .*Hkv=4"),
        (dict(H=4, Hkv=0), r"multiple of .*Hkv=0"),
    ],
)
def test_bad_gqa_ratio(kwargs: dict, match: str) -> None:
    q, k, v = qkv(**kwargs)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v)


def test_value_errors() -> None:
    q, k, v = qkv(T=3, S=5)
    with pytest.raises(ValueError, match=r"k has shape \(2, 4, 5, 16\).*D=32"):
        attention(q, rand(2, 4, 5, 16), v)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 7\).*\(2, 5\)"):
        attention(q, k, v, mask=np.ones((2, 7), bool))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4, 3, 4\)"):
        attention(q, k, v, mask=np.ones((2, 4, 3, 4), bool))
    with pytest.raises(ValueError, match=r"only 0/1"):
        attention(q, k, v, mask=np.full((2, 5), -np.inf, np.float32))
    with pytest.raises(ValueError, match=r"past_key and past_value"):
        attention(q, k, v, past_key=k)
    with pytest.raises(ValueError, match=r"past_value has shape"):
        attention(q, k, v, past_key=rand(2, 4, 2, 32), past_value=rand(2, 4, 3, 32))
    with pytest.raises(ValueError, match=r"q must be 4-D"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"batch size mismatch"):
        attention(q, k[:1], v[:1])


def test_softcap_the_spec_the_torch_op_and_onnxruntime_agree() -> None:
    """Gemma 2's soft-capped scores: the spec, kiln's torch op (its eager math) and onnxruntime running the ONNX
    Attention node the op exports to, over a past, grouped-query heads and a padding mask."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    import kiln.kernels.attention.torch_ops  # noqa: F401 (registers torch.ops.kiln)

    q, k, v = qkv(B=2, H=4, Hkv=2, T=3, S=3, D=8, seed=4)
    q *= 3  # scores large enough for the cap to bite
    past_k, past_v = rand(2, 2, 5, 8, seed=9), rand(2, 2, 5, 8, seed=10)
    mask = np.ones((2, 1, 3, 8), bool)
    mask[1, :, :, :2] = False  # left padding of row 1
    mask &= causal_mask(3, 8)
    spec = attention(q, k, v, mask=mask, scale=0.5, softcap=2.0, past_key=past_k, past_value=past_v)
    uncapped = attention(q, k, v, mask=mask, scale=0.5, past_key=past_k, past_value=past_v)
    assert np.abs(spec.out - uncapped.out).max() > 1e-2  # the cap changes the answer
    t = torch.from_numpy
    ours = torch.ops.kiln.attention_kv(t(q), t(k), t(v), t(mask), t(past_k), t(past_v), 0.5, 2.0)
    np.testing.assert_allclose(ours[0].numpy(), spec.out, atol=ATOL)
    np.testing.assert_allclose(ours[1].numpy(), spec.present_key, atol=0)
    names = ["q", "k", "v", "mask", "past_key", "past_value"]
    node = helper.make_node("Attention", names, ["y", "present_key", "present_value"], scale=0.5, softcap=2.0)
    dtypes = [TensorProto.FLOAT] * 3 + [TensorProto.BOOL] + [TensorProto.FLOAT] * 2
    graph = helper.make_graph([node], "capped", [helper.make_tensor_value_info(n, d, None) for n, d in zip(names, dtypes)],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(["y"], dict(zip(names, (q, k, v, mask, past_k, past_v))))[0]
    np.testing.assert_allclose(y, spec.out, atol=ATOL)
