"""The Triton attention kernel against the NumPy spec (kiln.kernels.attention.reference).

Without CUDA the kernel runs on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which is slow: shapes stay small. bf16 runs only on a GPU (the interpreter holds bf16 as uint16
and its tl.dot gives garbage). The ahead-of-time compile to PTX needs no GPU and is tested in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from kiln.kernels.attention.reference import attention as reference
from kiln.kernels.attention.triton import attention

# tests/conftest.py has chosen: interpreter on CPU tensors, or the compiled kernel on CUDA tensors.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
# atol, rtol against the spec computed in fp32 from the same (rounded) inputs.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def qkv(B: int, H: int, Hkv: int, T: int, S: int, D: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g).to(dtype)  # (B, H, T, D)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)  # (B, Hkv, S, D)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    return q, k, v


def padding_mask(B: int, S: int, key_starts, key_lengths) -> np.ndarray | None:
    """The (B, S) key padding mask of the spec that the kernel's key ranges stand for."""
    if key_starts is None and key_lengths is None:
        return None
    starts = [0] * B if key_starts is None else list(key_starts)
    ends = [S] * B if key_lengths is None else list(key_lengths)
    j = np.arange(S)
    return np.stack([(j >= s) & (j < e) for s, e in zip(starts, ends)])  # (B, S)


def check(B=1, H=2, Hkv=2, T=7, S=7, D=32, *, dtype=torch.float32, causal=False, key_starts=None, key_lengths=None,
          scale=None, seed=0, **launch) -> np.ndarray:
    q, k, v = qkv(B, H, Hkv, T, S, D, dtype, seed)
    as_tensor = lambda x: None if x is None else torch.tensor(x, dtype=torch.int32, device=DEVICE)  # noqa: E731
    out = attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), causal=causal, key_starts=as_tensor(key_starts),
                    key_lengths=as_tensor(key_lengths), scale=scale, **launch)
    assert out.shape == (B, H, T, D) and out.dtype == dtype
    expected = reference(q.float().numpy(), k.float().numpy(), v.float().numpy(), causal=causal, scale=scale,
                         mask=padding_mask(B, S, key_starts, key_lengths)).out  # (B, H, T, D) fp32
    got = out.float().cpu().numpy()
    atol, rtol = TOL[dtype]
    np.testing.assert_allclose(got, expected, atol=atol, rtol=rtol)
    return got


# (B, H, Hkv, T, S, D, causal): odd lengths, length 1, GQA 1/2/4 and MQA, every head dim, several blocks.
SHAPES = [
    pytest.param(1, 2, 2, 1, 1, 32, False, id="T1-S1"),
    pytest.param(2, 4, 4, 7, 7, 32, False, id="T7"),
    pytest.param(2, 4, 2, 7, 7, 64, True, id="T7-causal-gqa2"),
    pytest.param(1, 8, 2, 13, 13, 32, False, id="T13-gqa4"),
    pytest.param(1, 4, 1, 13, 13, 128, True, id="T13-causal-mqa-D128"),
    pytest.param(1, 2, 1, 1, 37, 64, True, id="decode-T1-S37-mqa"),
    pytest.param(2, 8, 2, 1, 37, 128, True, id="decode-T1-S37-gqa4-D128"),
    pytest.param(1, 4, 2, 7, 37, 32, True, id="chunk-T7-past30"),
    pytest.param(1, 2, 2, 13, 7, 32, True, id="causal-T-gt-S"),
    pytest.param(1, 2, 1, 70, 70, 32, True, id="T70-causal-multiblock"),
    pytest.param(1, 2, 2, 5, 150, 64, False, id="S150-multiblock"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B, H, Hkv, T, S, D, causal", SHAPES)
def test_matches_reference(B, H, Hkv, T, S, D, causal, dtype) -> None:
    check(B, H, Hkv, T, S, D, dtype=dtype, causal=causal)


@pytest.mark.parametrize("seed", range(12))
def test_random_shapes(seed) -> None:
    # A sweep beyond the hand-picked shapes: any mix of lengths, group sizes, head dims, masks and dtypes.
    rng = np.random.default_rng(seed)
    Hkv = int(rng.choice([1, 2]))
    H = Hkv * int(rng.choice([1, 2, 4]))
    T = int(rng.integers(1, 20))
    S = T + int(rng.choice([0, 0, rng.integers(1, 80)]))  # no cache, or a past of up to 79 keys
    B = int(rng.integers(1, 4))
    starts = [int(x) for x in rng.integers(0, S // 2 + 1, B)] if rng.random() < 0.5 else None
    check(B, H, Hkv, T, S, int(rng.choice([32, 64, 128])), dtype=[torch.float32, torch.float16][seed % 2],
          causal=bool(rng.random() < 0.7), key_starts=starts, seed=seed)


def test_causal_rows_before_first_key_are_zero() -> None:
    # T > S: the first T - S query rows see no key; the spec gives them zeros, not NaN.
    got = check(T=13, S=7, causal=True)
    assert not np.isnan(got).any() and (got[:, :, :6] == 0).all() and (got[:, :, 6] != 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_right_padding_by_key_lengths(dtype) -> None:
    check(B=3, H=4, Hkv=2, T=13, S=13, D=32, dtype=dtype, key_lengths=[13, 9, 1])


def test_right_padding_multiblock_and_empty_row() -> None:
    got = check(B=3, H=2, Hkv=1, T=5, S=150, D=32, key_lengths=[150, 70, 0])
    assert (got[2] == 0).all()  # a row with no key at all


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_left_padded_prefill(dtype) -> None:
    # A decoder's left-padded prompts: row b's tokens start at key_starts[b]; its padded query rows see nothing.
    got = check(B=3, H=4, Hkv=2, T=13, S=13, D=64, dtype=dtype, causal=True, key_starts=[0, 4, 12])
    assert (got[1, :, :4] == 0).all() and (got[2, :, :12] == 0).all()


def test_left_padded_decode_over_cache() -> None:
    # Decode step over a cache of 36 past tokens + 1 new one, with rows of different prompt lengths.
    check(B=3, H=8, Hkv=2, T=1, S=37, D=64, causal=True, key_starts=[0, 5, 30])


def test_left_padded_decode_past_a_key_block() -> None:
    # key_starts beyond the first key block: the loop starts at that block and masks inside it.
    check(B=2, H=2, Hkv=1, T=3, S=150, D=32, causal=True, key_starts=[70, 129])


@pytest.mark.parametrize("T, causal, key_starts, key_lengths", [
    pytest.param(1, True, None, None, id="decode"),
    pytest.param(1, True, [0, 100, 150], None, id="decode-left-padded-to-nothing"),  # early splits see no key
    pytest.param(5, False, None, [150, 20, 0], id="right-padded"),  # late splits see no key
    pytest.param(7, True, [3, 0, 60], None, id="chunked-prefill"),
])
def test_split_kv_matches_reference(T, causal, key_starts, key_lengths) -> None:
    # Four splits of 48 keys (three 16-key blocks each) over 150, merged by combine_kernel: the flash-decoding path
    # a GPU takes for launches too small to fill it, forced here so that the interpreter runs it too.
    got = check(B=3, H=4, Hkv=2, T=T, S=150, D=32, causal=causal, key_starts=key_starts, key_lengths=key_lengths,
                block_n=16, num_splits=4)
    if key_starts is not None and key_starts[1] == 100:
        assert (got[2] == 0).all()  # a row whose padding covers every key: zeros, as in the single pass


@pytest.mark.parametrize("num_splits", [None, 4])
def test_empty_key_set_gives_zeros(num_splits) -> None:
    # S == 0 (no cache and no new keys): every row sees nothing, on the single pass and when splits are asked for.
    got = check(B=1, H=2, Hkv=2, T=3, S=0, D=32, num_splits=num_splits)
    assert (got == 0).all()


def test_key_range_both_sides() -> None:
    check(B=2, H=2, Hkv=2, T=7, S=37, D=32, key_starts=[3, 10], key_lengths=[30, 37])


def test_scale() -> None:
    check(B=1, H=2, Hkv=1, T=7, S=13, D=32, causal=True, scale=0.37)


def test_non_contiguous_inputs() -> None:
    # (B, T, H, D) projections viewed as (B, H, T, D), as a model produces them.
    B, H, T, D = 2, 4, 7, 32
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, T, H, D, generator=g).transpose(1, 2) for _ in range(3))  # (B, H, T, D) views
    out = attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), causal=True)
    expected = reference(q.numpy(), k.numpy(), v.numpy(), causal=True).out
    np.testing.assert_allclose(out.cpu().numpy(), expected, atol=1e-5, rtol=1e-5)


def test_rejects_what_it_cannot_do() -> None:
    q, k, v = qkv(1, 4, 2, 3, 3, 32, torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        attention(q[..., :24], k[..., :24], v[..., :24])
    with pytest.raises(ValueError, match="multiple"):
        attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="one dtype"):
        attention(q, k.half(), v)
    with pytest.raises(ValueError, match="Dv == D"):
        attention(q, k, v[..., :16])
    with pytest.raises(ValueError, match="key_lengths"):
        attention(q, k, v, key_lengths=torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="dtype"):
        attention(q.double(), k.double(), v.double())


def test_package_import_stays_light() -> None:
    code = "import sys, kiln.kernels.attention; print(sorted(m for m in ('torch', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


AOT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from kiln.kernels.attention.triton import attention_kernel, LOG2E

    dtype, arch, D = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ptr = "*" + dtype
    signature = {"Q": ptr, "K": ptr, "V": ptr, "KeyStarts": "*i32", "KeyLengths": "*i32",
                 "T": "i32", "S": "i32", "H": "i32", "HKV": "i32", "Out": ptr}
    constexprs = {"QK_SCALE": D ** -0.5 * LOG2E, "CAUSAL": True, "IEEE_FP32": dtype == "fp32",
                  "BLOCK_M": 64, "BLOCK_N": 64 if D < 128 else 32, "BLOCK_D": D}
    signature.update({name: "constexpr" for name in constexprs})
    src = triton.compiler.ASTSource(fn=attention_kernel, signature=signature, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 2})
    meta = kernel.metadata
    print(json.dumps({"ptx": kernel.asm["ptx"], "name": meta.name, "shared": meta.shared,
                      "global_scratch": meta.global_scratch_size, "profile_scratch": meta.profile_scratch_size}))
    """
)


@pytest.mark.parametrize("dtype, arch, D", [("fp16", 80, 64), ("bf16", 90, 128), ("fp32", 80, 32)])
def test_aot_compile_to_ptx(dtype, arch, D) -> None:
    # What TensorRT's aot_impl needs: PTX for an explicit target with no GPU present, and no scratch memory
    # (TensorRT passes null for Triton's scratch pointers). Compiling needs the real compiler, not the interpreter.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences 3.9's warning about a default that 3.10 changes
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT, dtype, str(arch), str(D)], capture_output=True,
                          text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    if proc.returncode != 0:
        pytest.fail(f"triton.compile for sm_{arch} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ptx = result["ptx"]
    assert f".target sm_{arch}" in ptx and ".entry attention_kernel" in ptx
    assert result["global_scratch"] == 0 and result["profile_scratch"] == 0
    assert result["shared"] > 0


# --- GPU only: bf16, and torch SDPA as a second oracle on bigger shapes. ---


@pytest.mark.gpu
@pytest.mark.parametrize("B, H, Hkv, T, S, D, causal", SHAPES)
def test_bf16_matches_reference(B, H, Hkv, T, S, D, causal) -> None:
    check(B, H, Hkv, T, S, D, dtype=torch.bfloat16, causal=causal)


@pytest.mark.gpu
def test_bf16_padding() -> None:
    check(B=3, H=4, Hkv=2, T=13, S=37, D=64, dtype=torch.bfloat16, causal=True, key_starts=[0, 4, 20])


def sdpa(q, k, v, *, causal: bool, key_lengths=None) -> torch.Tensor:
    """torch SDPA with the spec's semantics: causality bottom-right aligned, folded into a bool mask."""
    B, H, T, D = q.shape
    S = k.shape[2]
    keep = torch.ones(B, 1, T, S, dtype=torch.bool, device=q.device)
    if causal:
        keep &= torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if key_lengths is not None:
        keep &= (torch.arange(S, device=q.device)[None, :] < key_lengths[:, None])[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=H != k.shape[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "B, H, Hkv, T, S, D, causal, padded",
    [
        (2, 12, 12, 512, 512, 64, False, True),
        (2, 8, 2, 1000, 1000, 128, True, False),
        (4, 32, 8, 1, 4096, 128, True, False),
        (3, 9, 3, 17, 2049, 32, True, True),
    ],
)
def test_gpu_as_accurate_as_sdpa(B, H, Hkv, T, S, D, causal, padded, dtype) -> None:
    q, k, v = (x.cuda() for x in qkv(B, H, Hkv, T, S, D, dtype, seed=5))
    lengths = torch.tensor([S - 7 * b for b in range(B)], device="cuda") if padded else None
    exact = sdpa(q.float(), k.float(), v.float(), causal=causal, key_lengths=lengths)  # fp32 oracle
    ours = attention(q, k, v, causal=causal, key_lengths=lengths)
    theirs = sdpa(q, k, v, causal=causal, key_lengths=lengths)
    ours_err = (ours.float() - exact).abs().max().item()
    theirs_err = (theirs.float() - exact).abs().max().item()
    assert ours_err <= 2 * theirs_err + TOL[dtype][0], (ours_err, theirs_err)
