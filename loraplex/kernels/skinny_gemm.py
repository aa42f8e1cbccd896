"""Decode-shaped GEMM: few rows against a large weight, bound by reading the weight once.

    y[m, n] = sum_k x[m, k] * W[n, k]  (+ bias[n])        x (M, K), W (N, K), y (M, N), M <= 128

Schedule: a program per (block of BLOCK_N output columns, split of K), so that a weight of a few thousand
columns still spreads over every SM: the split count gives about two programs per SM. Each program streams its
(BLOCK_N, k_per_split) part of W in BLOCK_K steps (K's step is a multiple of BLOCK_K, so no load is masked along
K and every one is a full vector) against x's rows (padded to BLOCK_M), and accumulates in float32. With one
split it writes y; with several, it stores its partial sum, and the last split of the column block to finish (a
counter, acq_rel, reset by that program) sums the partials in split order, adds the bias and writes y in y's
dtype once: deterministic, one launch, no separate reduction kernel.

Reference: ``torch.nn.functional.linear``; ``tests/test_kernels.py`` compares them. Off unless
``LORAPLEX_SKINNY_GEMM=1`` (``layers/linear.py``): it has not been timed against cuBLAS on a GPU yet.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from loraplex.kernels.common import INTERPRET, Launcher, dot_precision, num_sms

MAX_ROWS = 128


@triton.jit(do_not_specialize=["M", "k_per_split", "splits"])
def _skinny_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, part_ptr, sem_ptr, M, N, K, stride_xm, stride_ym, k_per_split,
                   splits, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # x (M, K) and W (N, K) with unit stride along K, y (M, N) with unit stride along N; part (splits, M, N) float32
    nb = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # K in blocks of BLOCK_K (k_per_split is a multiple of it): an offset kb * BLOCK_K, unlike a loop from an
    # unspecialised start, is known aligned, so the loads below go as 16-byte vectors
    kb_lo = split * (k_per_split // BLOCK_K)
    kb_hi = tl.minimum(kb_lo + k_per_split // BLOCK_K, K // BLOCK_K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        xs = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None], other=0.0)  # (BLOCK_M, BLOCK_K)
        ws = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None], other=0.0)  # (BLOCK_N, BLOCK_K)
        if UPCAST:  # the interpreter's tl.dot cannot take bf16; the products are exact in float32
            xs = xs.to(tl.float32)
            ws = ws.to(tl.float32)
        acc += tl.dot(xs, tl.trans(ws), input_precision=PRECISION)
    out = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if splits == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        cell = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(part_ptr + split.to(tl.int64) * M * N + cell, acc, mask=mask)
        counter = sem_ptr + nb
        if tl.atomic_add(counter, 1, sem="acq_rel") == splits - 1:  # the last split of this column block
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, splits):
                total += tl.load(part_ptr + s * M * N + cell, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counter, 0, sem="relaxed")


_launch = Launcher(_skinny_kernel)
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(n: int, device: torch.device) -> torch.Tensor:
    """At least ``n`` int32 zeros on ``device`` for the split counters (each launch leaves them zero); its own
    set, since the LoRA shrink's may be in use on the side stream at the same time."""
    have = _COUNTERS.get(device)
    if have is None or have.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"skinny GEMM: {n} split counters needed inside a CUDA graph capture, "
                               f"{0 if have is None else have.numel()} made before it")
        have = _COUNTERS[device] = torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device)
    return have


@functools.lru_cache(maxsize=1024)
def skinny_config(M: int, N: int, K: int, device: Optional[torch.device] = None, split_k: Optional[int] = None) -> dict:
    """Tiles and the split of K: 64 output columns and 128 of K a step (a 16 KB bf16 block of W), rows padded
    to a power of two from 16; K split so that the programs number about twice the SMs (``split_k``: so many
    splits at most, for tests and tuning)."""
    block_n, block_k = 64, 128
    n_blocks = triton.cdiv(N, block_n)
    k_blocks = K // block_k
    splits = max(1, min(k_blocks, split_k or triton.cdiv(2 * num_sms(device), n_blocks)))
    k_per_split = triton.cdiv(k_blocks, splits) * block_k
    block_m = max(16, triton.next_power_of_2(M))
    # pipeline stages of (W block + x block) in shared memory: at most about 96 KB (sm_90 compiles 192 KB for
    # 128 rows in 4 stages, more than an A100 has)
    stages = {16: 4, 32: 4, 64: 3}.get(block_m, 2)
    return dict(block_m=block_m, block_n=block_n, block_k=block_k, n_blocks=n_blocks,
                splits=triton.cdiv(K, k_per_split), k_per_split=k_per_split, num_warps=4, num_stages=stages)


def skinny_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`skinny_linear` takes ``x @ w.T``: at most MAX_ROWS rows, K a multiple of 128, contiguous
    rows, one dtype."""
    return (x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and w.dim() == 2 and x.shape[1] == w.shape[1]
            and w.shape[1] % 128 == 0 and x.stride(1) == 1 and w.is_contiguous() and x.dtype == w.dtype)


def skinny_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  split_k: Optional[int] = None) -> torch.Tensor:
    """``x @ w.T (+ bias)`` for decode-sized ``x`` (see :func:`skinny_fits`), in ``x``'s dtype (``split_k``: see
    :func:`skinny_config`)."""
    if not skinny_fits(x, w):
        raise ValueError(f"skinny_linear: x {tuple(x.shape)} {x.dtype} against w {tuple(w.shape)} {w.dtype}: needs "
                         f"1-{MAX_ROWS} rows, K a multiple of 128, unit strides along K, one dtype")
    M, K = x.shape
    N = w.shape[0]
    cfg = skinny_config(M, N, K, x.device, split_k)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    splits = cfg["splits"]
    part = torch.empty(splits, M, N, dtype=torch.float32, device=x.device) if splits > 1 else y
    sem = _counters(cfg["n_blocks"], x.device) if splits > 1 else y
    _launch((cfg["n_blocks"], splits),
            (x, w, y if bias is None else bias, y, part, sem, M, N, K, x.stride(0), y.stride(0), cfg["k_per_split"],
             splits),
            dict(BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], HAS_BIAS=bias is not None,
                 PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y
