"""Segmented LoRA shrink and expand in one launch (experimental: ``LORAPLEX_LORA_FUSED=1``).

    y[t, off_i:off_i+n_i] += (x[t] @ A[i, slot(t), :r].T) @ B[slot(t), off_i:off_i+n_i, :r].T * scale[i, slot(t)]

What :func:`~loraplex.kernels.lora_shrink.lora_shrink` then
:func:`~loraplex.kernels.lora_expand.lora_expand` compute, without the float32 partials between them: each
program takes one tile of rows (one adapter), one slice and one block of output columns, computes the tile's
whole shrink over the input features (no split-K: the sum stays in the program), rounds it to B's dtype as the
two-kernel path does, and applies the expand with the same epilogue (scale, per-slot LoRA bias and DoRA scale,
one rounding into ``y``). The shrink is recomputed by every output block of a tile, so the block width is
chosen large enough that the programs number about the SMs: on a decode step the work is a few hundred
kilobytes of A per program read from L2, where the two-kernel path pays two launches' latency chains
(measured on an H200 at batch 32: 5.9 us shrink + 7.9 us expand per layer module). Not for row-parallel layers
under tensor parallelism, whose delta goes into each rank's partial sums before the layer's all-reduce
(``LinearWithLoRA._row_parallel_forward``). Measured slower than the two kernels on an H200 (9.42 against 7.39
ms a step with one adapter, 24.65 against 9.79 with 32: docs/benchmarks.md), so it stays off by default.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from loraplex.kernels.common import INTERPRET, Launcher, dot_precision, identity_pages, num_sms
from loraplex.kernels.lora_expand import add_delta


@triton.jit(do_not_specialize=["T"])
def _fused_kernel(
    y_ptr, x_ptr, a_ptr, b_ptr, tiles_ptr, ranks_ptr, scales_ptr, slice_ptr, pages_ptr, ext_ptr, ext_rows_ptr,
    bias_ptr, T, K, stride_xm, stride_ym, n_total, num_slots, num_pages,
    NUM_SLICES: tl.constexpr, N_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PAGE: tl.constexpr, MAX_PAGES: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, EXTRAS: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # a (slices, pages, PAGE, K), b (pages, n_total, PAGE), ranks / scales (slices, slots), pages (slots,
    # MAX_PAGES): contiguous; x (T, K) and y (T, n_total) with unit stride along their last dim.
    tile = tl.program_id(0)
    i = (tl.program_id(1) // N_BLOCKS).to(tl.int64)  # slice
    nb = tl.program_id(1) % N_BLOCKS  # output block within the slice

    slot = tl.load(tiles_ptr + tile * 3 + 2)
    rank = tl.load(ranks_ptr + i * num_slots + tl.maximum(slot, 0))
    width = tl.load(slice_ptr + i * 2 + 1)
    if (slot < 0) | (rank == 0) | (nb * BLOCK_N >= width):
        return
    row0 = tl.load(tiles_ptr + tile * 3)
    row_end = tl.load(tiles_ptr + tile * 3 + 1)
    offset = tl.load(slice_ptr + i * 2)
    scale = tl.load(scales_ptr + i * num_slots + slot)

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < row_end
    n_mask = offs_n < width
    cols = offset + offs_n  # columns of y (and of B's middle dim)
    x_base = x_ptr + offs_m[:, None] * stride_xm

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        page = tl.load(pages_ptr + slot * MAX_PAGES + offs_r // PAGE, mask=r_mask, other=0).to(tl.int64)
        a_base = a_ptr + ((i * num_pages + page[None, :]) * PAGE + (offs_r % PAGE)[None, :]) * K
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xs = tl.load(x_base + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_base + offs_k[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            if UPCAST:  # the interpreter's tl.dot cannot take bf16; products are exact in float32 anyway
                xs = xs.to(tl.float32)
                at = at.to(tl.float32)
            h += tl.dot(xs, at, input_precision=PRECISION)  # (BLOCK_M, BLOCK_K) @ (BLOCK_K, BLOCK_R)
        bt = tl.load(b_ptr + (page[:, None] * n_total + cols[None, :]) * PAGE + (offs_r % PAGE)[:, None],
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # (BLOCK_R, BLOCK_N)
        if UPCAST:  # round as the GPU does, multiply in float32
            hb = h.to(bt.dtype).to(tl.float32)
            bt = bt.to(tl.float32)
        else:
            hb = h.to(bt.dtype)
        acc += tl.dot(hb, bt, input_precision=PRECISION)

    add_delta(y_ptr, acc, scale, offs_m, cols, m_mask, n_mask, stride_ym, slot, ext_ptr, ext_rows_ptr, bias_ptr,
              n_total, EXTRAS, HAS_BIAS)


_launch_fused = Launcher(_fused_kernel)


@functools.lru_cache(maxsize=4096)
def fused_config(max_rank: int, K: int, max_width: int, work_tiles: int, num_slices: int,
                 block_n: Optional[int] = None, device: Optional[torch.device] = None) -> dict:
    """Output blocks wide enough that the programs doing work number about the SMs (each recomputes its
    tile's shrink), 64 to 512 columns (tiles of at most 16 rows: the accumulator stays at 8K floats); K steps
    of 128."""
    block_r = min(64, max(16, triton.next_power_of_2(max_rank)))
    block_k = min(128, max(16, triton.next_power_of_2(K)))
    if block_n is None:
        per_program = triton.cdiv(work_tiles * num_slices * max_width, max(1, num_sms(device)))
        block_n = min(512, max(64, triton.next_power_of_2(per_program)))
    block_n = min(block_n, max(16, triton.next_power_of_2(max_width)))
    return dict(block_r=block_r, block_k=block_k, block_n=block_n, n_blocks=triton.cdiv(max_width, block_n),
                num_warps=8 if block_n >= 512 else 4)


def lora_shrink_expand(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ranks_t: torch.Tensor,
                       scales_t: torch.Tensor, slice_meta: torch.Tensor, max_width: int, tiles: torch.Tensor,
                       block_m: int, extras: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                       bias: Optional[torch.Tensor] = None, pages: Optional[torch.Tensor] = None,
                       work_tiles: Optional[int] = None, block_n: Optional[int] = None) -> None:
    """``y`` += the LoRA delta of ``x``, in place: :func:`lora_shrink` then :func:`lora_expand` in one launch.

    y (T, sum(n_i)), x (T, K); a (slices, pages, page_rank, K); b (pages, sum(n_i), page_rank); ranks_t,
    scales_t (slices, slots); slice_meta (slices, 2) int32 (offset, width); tiles (num_tiles, 3) int64, each
    at most ``block_m`` rows of one segment; ``pages`` (slots, max_pages) int32 (default: the padded layout);
    ``extras`` and ``bias`` as for :func:`lora_expand`; ``work_tiles``: the tiles that carry rows when the
    list is padded (CUDA graphs); ``block_n`` overrides the heuristic (tests, tuning)."""
    if y.stride(1) != 1:
        raise ValueError(f"lora_shrink_expand updates y in place and needs unit column stride, got {y.stride()}")
    if x.stride(1) != 1:
        x = x.contiguous()
    T, K = x.shape
    num_slices, num_pages, page_rank, _ = a.shape
    if pages is None:
        pages = identity_pages(num_pages, a.device)
    assert a.is_contiguous() and b.is_contiguous() and ranks_t.is_contiguous() and scales_t.is_contiguous() \
        and pages.is_contiguous(), "A and B stacks, ranks, scales and pages must be contiguous"
    num_tiles = tiles.shape[0]
    if num_tiles == 0 or T == 0:
        return
    assert block_m <= 16, "the fused kernel takes tiles of at most 16 rows (decode and graph steps)"
    max_rank = pages.shape[1] * page_rank
    cfg = fused_config(max_rank, K, max_width, work_tiles or num_tiles, num_slices, block_n, x.device)
    ext, ext_rows = extras if extras is not None else (y, y)  # placeholders: never read without EXTRAS
    if extras is not None:
        assert ext.shape[1:] == (2, b.shape[1]) and ext.dtype == torch.float32 and ext.is_contiguous() \
            and ext_rows.shape == (ranks_t.shape[1],), "extras: (rows, 2, sum(slices)) float32 and (slots,) rows"
    grid = (num_tiles, num_slices * cfg["n_blocks"])
    _launch_fused(
        grid,
        (y, x, a, b, tiles, ranks_t, scales_t, slice_meta, pages, ext, ext_rows, y if bias is None else bias,
         T, K, x.stride(0), y.stride(0), b.shape[1], ranks_t.shape[1], num_pages),
        dict(NUM_SLICES=num_slices, N_BLOCKS=cfg["n_blocks"], BLOCK_M=block_m, BLOCK_N=cfg["block_n"],
             BLOCK_R=cfg["block_r"], BLOCK_K=cfg["block_k"], PAGE=page_rank, MAX_PAGES=pages.shape[1],
             PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET, EXTRAS=extras is not None,
             HAS_BIAS=extras is not None and bias is not None),
        num_warps=cfg["num_warps"],
    )
