"""Fused attention forward in Triton (flash-attention style: tiled, online softmax, nothing (T, S)-sized in memory).

The spec is :mod:`kiln.kernels.attention.reference`; this kernel computes the same thing for the cases a fused
kernel needs, and is tested against it (``tests/kernels/test_attention_triton.py``):

* q (B, H, T, D), k/v (B, Hkv, S, D), out (B, H, T, D); contiguous; fp16, bf16 or fp32; D a power of two, 16..256
  (kiln's models use 32, 64, 128). Values have the same head dim as keys (Dv == D).
* Grouped-query heads: query head h reads kv head ``h // (H // Hkv)`` (MQA when Hkv == 1).
* ``causal`` is bottom-right aligned as in the spec: query i sits at absolute position ``S - T + i`` and sees keys
  ``j <= S - T + i``. With a KV cache (k/v = past + new) that offset is the past length P, so decode (T == 1 over a
  long cache) and chunked prefill are the same call.
* Padding is per batch row, as the key range ``key_starts[b] <= j < key_lengths[b]`` (two int32 vectors of length B).
  Right padding (encoders) sets ``key_lengths``; left padding (kiln's decoders: prompts are left-padded so that every
  row's newest token is at the end of the cache, where causal alignment to S puts it) sets ``key_starts``. The causal
  offset stays ``S - T`` for every row, exactly as the spec combines a (B, S) padding mask with ``causal``.
* A query row that sees no key (a padded row, or T > S under causal) outputs zeros, the spec's choice.

The launch is one program per (query block, batch * head): ``grid = (cdiv(T, BLOCK_M), B * H)``. The kernel signature
is laid out for ahead-of-time compilation (TensorRT's Python plugins): input pointers, then int32 scalars, then the
output pointer, then compile-time constants (the softmax scale, the flags and the block sizes). It needs no scratch
memory and builds no TMA descriptors, because TensorRT passes null for Triton's trailing scratch arguments.

Importing this module imports torch and triton; ``kiln.kernels.attention`` itself does not, so the runtime stays light.
On a machine without a GPU the kernel runs on CPU tensors under ``TRITON_INTERPRET=1`` (set before importing triton).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["attention", "attention_kernel", "attention_split_kernel", "combine_kernel", "block_sizes", "split_count",
           "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = math.log2(math.e)


@triton.jit
def _attend(q, K, V, kv_base, lo, hi, key_start, key_end, diag, offs_n, offs_d, QK_SCALE: tl.constexpr,
            CAUSAL: tl.constexpr, IEEE_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr):
    """Keys lo <= j < hi (lo a multiple of BLOCK_N) for one query block -> (unnormalized acc (M, D), running max m
    (M,) of the base-2 logits, running sum l (M,)), all fp32. A row that saw no key has m = -inf, l = 0, acc = 0."""
    # Online softmax state, in fp32 whatever the input dtype: running max (base-2 scores), running sum, output.
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + offs_n  # (BLOCK_N,) key index j
        key_ok = (keys >= key_start) & (keys < key_end)
        # k is loaded transposed, (D, N), so that q @ k is a plain dot.
        k = tl.load(K + kv_base + keys[None, :] * BLOCK_D + offs_d[:, None], mask=key_ok[None, :], other=0.0)
        v = tl.load(V + kv_base + keys[:, None] * BLOCK_D + offs_d[None, :], mask=key_ok[:, None], other=0.0)  # (N, D)

        if IEEE_FP32:
            qk = tl.dot(q, k, input_precision="ieee")  # (M, N) fp32
        else:
            qk = tl.dot(q, k)
        keep = key_ok[None, :]
        if CAUSAL:
            keep = keep & (keys[None, :] <= diag[:, None])
        s = tl.where(keep, qk * QK_SCALE, float("-inf"))  # (M, N), base-2 logits; masked = -inf

        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # (M,)
        # A row that has seen only masked keys so far has max -inf; subtract 0 instead so that exp2(-inf - -inf)
        # never makes a NaN: every entry is -inf and exp2 gives exact zeros (the spec's fully-masked-row rule).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])  # (M, N)
        alpha = tl.math.exp2(m_i - m_safe)  # (M,) rescales what was summed under the old max; 0 while m_i = -inf
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE_FP32:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)  # fp16/bf16 p, as flash-attention: the tensor cores take 16-bit inputs
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    return acc, m_i, l_i


@triton.jit
def _query_block(Q, KeyStarts, KeyLengths, T, S, H, HKV, pid_m, pid_bh, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (pid_m, pid_bh)'s query block: its q tile, offsets, and the key range [lo, hi) it may see."""
    b = pid_bh // H
    h = pid_bh % H
    kv_h = h // (H // HKV)  # grouped-query heads share one kv head

    # int64 bases: B * Hkv * S * D passes 2**31 for long caches.
    q_base = (b * H + h).to(tl.int64) * T * BLOCK_D
    kv_base = (b * HKV + kv_h).to(tl.int64) * S * BLOCK_D

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query index i
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) key index within a block
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = offs_m < T

    q = tl.load(Q + q_base + offs_m[:, None] * BLOCK_D + offs_d[None, :], mask=row_ok[:, None], other=0.0)  # (M, D)

    key_start = tl.load(KeyStarts + b)
    key_end = tl.minimum(tl.load(KeyLengths + b), S)
    # Only visit key blocks that some row of this query block may see: padding bounds the range on both sides, and
    # causality ends it at the last row's diagonal (S - T + i_max). Blocks past that would be fully masked anyway.
    lo = (key_start // BLOCK_N) * BLOCK_N
    hi = key_end
    if CAUSAL:
        hi = tl.minimum(hi, S - T + (pid_m + 1) * BLOCK_M)
    diag = offs_m + (S - T)  # (BLOCK_M,) absolute position of each query row

    return q, q_base, kv_base, lo, hi, key_start, key_end, diag, offs_m, offs_n, offs_d, row_ok


@triton.jit
def attention_kernel(
    Q,  # (B, H, T, D) pointer
    K,  # (B, Hkv, S, D) pointer
    V,  # (B, Hkv, S, D) pointer
    KeyStarts,  # (B,) int32: first key each batch row may see (left padding)
    KeyLengths,  # (B,) int32: one past the last key each batch row may see (right padding)
    T,  # int32: query length
    S,  # int32: key length (past + new)
    H,  # int32: query heads
    HKV,  # int32: key/value heads, H % HKV == 0
    Out,  # (B, H, T, D) pointer, q's dtype
    QK_SCALE: tl.constexpr,  # softmax scale * log2(e): the kernel exponentiates with exp2
    CAUSAL: tl.constexpr,
    IEEE_FP32: tl.constexpr,  # fp32 inputs: full-precision dot products instead of TF32
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner iteration
    BLOCK_D: tl.constexpr,  # == D
):
    q, q_base, kv_base, lo, hi, key_start, key_end, diag, offs_m, offs_n, offs_d, row_ok = _query_block(
        Q, KeyStarts, KeyLengths, T, S, H, HKV, tl.program_id(0), tl.program_id(1), CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D)
    acc, m_i, l_i = _attend(q, K, V, kv_base, lo, hi, key_start, key_end, diag, offs_n, offs_d, QK_SCALE, CAUSAL,
                            IEEE_FP32, BLOCK_M, BLOCK_N, BLOCK_D)
    # Rows that saw no key have l_i == 0 and acc == 0: divide by 1 so they come out as zeros.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_ptrs = Out + q_base + offs_m[:, None] * BLOCK_D + offs_d[None, :]  # (M, D)
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def attention_split_kernel(
    Q, K, V, KeyStarts, KeyLengths, T, S, H, HKV,  # as attention_kernel
    SPLIT_LEN,  # int32: keys per split, a multiple of BLOCK_N
    PartOut,  # (NS, B, H, T, D) fp32: each split's unnormalized output
    PartM,  # (NS, B, H, T) fp32: each split's running max of the base-2 logits
    PartL,  # (NS, B, H, T) fp32: each split's running sum
    QK_SCALE: tl.constexpr, CAUSAL: tl.constexpr, IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Split-KV ("flash-decoding") pass: program (m, b * h, split) attends over keys [split * SPLIT_LEN, + SPLIT_LEN)
    only, so a decode step spreads one long cache over many programs; :func:`combine_kernel` merges the splits."""
    pid_s = tl.program_id(2)
    q, q_base, kv_base, lo, hi, key_start, key_end, diag, offs_m, offs_n, offs_d, row_ok = _query_block(
        Q, KeyStarts, KeyLengths, T, S, H, HKV, tl.program_id(0), tl.program_id(1), CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D)
    lo = tl.maximum(lo, pid_s * SPLIT_LEN)  # both multiples of BLOCK_N
    hi = tl.minimum(hi, (pid_s + 1) * SPLIT_LEN)
    acc, m_i, l_i = _attend(q, K, V, kv_base, lo, hi, key_start, key_end, diag, offs_n, offs_d, QK_SCALE, CAUSAL,
                            IEEE_FP32, BLOCK_M, BLOCK_N, BLOCK_D)
    rows = pid_s.to(tl.int64) * tl.num_programs(1) * T + q_base // BLOCK_D + offs_m  # (M,) row in (NS, B, H, T)
    tl.store(PartOut + rows[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(PartM + rows, m_i, mask=row_ok)
    tl.store(PartL + rows, l_i, mask=row_ok)


@triton.jit
def combine_kernel(PartOut, PartM, PartL, Out, NS, ROWS, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per output row (of B * H * T): out = sum_s w_s acc_s / sum_s w_s l_s, w_s = 2^(m_s - max_s m_s).
    A row no split saw (every m_s = -inf) comes out as zeros, as in the single pass."""
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    ok = splits < NS
    m = tl.load(PartM + splits * ROWS + row, mask=ok, other=float("-inf"))  # (S,)
    l = tl.load(PartL + splits * ROWS + row, mask=ok, other=0.0)
    acc = tl.load(PartOut + (splits[:, None] * ROWS + row) * BLOCK_D + offs_d[None, :], mask=ok[:, None], other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # (S,); 0 for splits that saw nothing
    total = tl.sum(l * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)  # (D,)
    tl.store(Out + row * BLOCK_D + offs_d, out.to(Out.dtype.element_ty))


def block_sizes(T: int, D: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for a query length and head dim.

    16 is the smallest tile ``tl.dot`` compiles for on a GPU, so a decode step (T == 1) still uses 16 query rows (the
    other 15 are masked). Long queries use 64 rows; D == 128 halves the key block to stay within registers. A short
    query block (decode) walks the cache in 128-key blocks: half the loop trips, 1.4x faster on an H200 (fp16,
    D = 64, S = 4096; ``benchmarks/bench_triton_attention.py --sweep``); prefill keeps 64, which measured best there.
    """
    block_m = min(64, max(16, triton.next_power_of_2(T)))
    block_n = 32 if D >= 128 else 128 if block_m == 16 else 64
    return block_m, block_n


def split_count(programs: int, S: int, block_n: int, device: torch.device) -> int:
    """How many key splits a launch of ``programs`` (query blocks x B x H) needs to fill the GPU: about two programs
    per multiprocessor, each split at least two key blocks long. 1 (no split) on the CPU interpreter."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, programs), S // (2 * block_n)))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_lengths: torch.Tensor | None = None,
    key_starts: torch.Tensor | None = None,
    scale: float | None = None,
    allow_tf32: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Fused scaled-dot-product attention; see the module docstring for the semantics.

    Args:
        q: (B, H, T, D) queries.
        k, v: (B, Hkv, S, D) keys and values (past + new for a KV cache), q's dtype.
        causal: bottom-right aligned causal mask (query i sees keys j <= S - T + i).
        key_lengths: (B,) ints; row b sees keys j < key_lengths[b] (right padding). Default S.
        key_starts: (B,) ints; row b sees keys j >= key_starts[b] (left padding). Default 0.
        scale: multiplier of q @ k^T; default 1 / sqrt(D).
        allow_tf32: let fp32 inputs use TF32 tensor cores on a GPU (faster, ~1e-3 error); off by default so that fp32
            matches the spec to ~1e-5.
        block_m, block_n, num_warps, num_stages: launch overrides (benchmarks); defaults from :func:`block_sizes`.
        num_splits: split the keys over this many programs per query block and merge them after ("flash-decoding"),
            for launches too small to fill the GPU (a decode step: B x H programs over a long cache). Default
            :func:`split_count`; 1 = the single pass that the TensorRT plugin runs.

    Returns:
        (B, H, T, D) in q's dtype.
    """
    _check(q, k, v)
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    starts = _per_row(key_starts, "key_starts", B, 0, q.device)
    lengths = _per_row(key_lengths, "key_lengths", B, S, q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    out = torch.empty_like(q)
    if q.numel() == 0:
        return out
    default_m, default_n = block_sizes(T, D)
    block_m, block_n = block_m or default_m, block_n or default_n
    options = {}
    if num_warps is not None:
        options["num_warps"] = num_warps
    if num_stages is None and q.dtype == torch.float32:
        # fp32 tiles are twice as big: 3 stages of (BLOCK_N, 128) k/v tiles pass the 99 KiB of shared memory that
        # sm_86/sm_89 cards offer (A100/H100 have more); 2 stages stay under it.
        num_stages = 2
    if num_stages is not None:
        options["num_stages"] = num_stages
    grid = (triton.cdiv(T, block_m), B * H)
    constants = dict(QK_SCALE=scale * LOG2E, CAUSAL=bool(causal), IEEE_FP32=q.dtype == torch.float32 and not allow_tf32,
                     BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=D, **options)
    splits = num_splits or split_count(grid[0] * grid[1], S, block_n, q.device)
    split_len = max(1, triton.cdiv(triton.cdiv(S, splits), block_n)) * block_n  # whole key blocks per split
    splits = max(1, triton.cdiv(S, split_len))  # an empty cache (S == 0) is one pass that sees nothing
    if splits == 1:
        attention_kernel[grid](q, k, v, starts, lengths, T, S, H, Hkv, out, **constants)
        return out
    part_out = torch.empty(splits, B, H, T, D, dtype=torch.float32, device=q.device)
    part_m = torch.empty(splits, B, H, T, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    attention_split_kernel[(*grid, splits)](q, k, v, starts, lengths, T, S, H, Hkv, split_len, part_out, part_m,
                                            part_l, **constants)
    rows = B * H * T
    combine_kernel[(rows,)](part_out, part_m, part_l, out, splits, rows,
                            BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=D)
    return out


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; the Triton kernel supports {SUPPORTED_DTYPES}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(
            f"k and v must be (B, Hkv, S, D) = ({B}, Hkv, S, {D}) to match q {tuple(q.shape)}, "
            f"got k {tuple(k.shape)}, v {tuple(v.shape)} (the kernel needs Dv == D)"
        )
    Hkv = k.shape[1]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"query heads H={H} must be a positive multiple of key/value heads Hkv={Hkv}")
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"head dim D={D} must be a power of two in [16, 256] (one tile spans the whole head)")


def _per_row(values: torch.Tensor | None, name: str, B: int, default: int, device: torch.device) -> torch.Tensor:
    if values is None:
        return torch.full((B,), default, dtype=torch.int32, device=device)
    values = torch.as_tensor(values, device=device)
    if values.shape != (B,):
        raise ValueError(f"{name} must have shape (B,) = ({B},), got {tuple(values.shape)}")
    return values.to(torch.int32).contiguous()
