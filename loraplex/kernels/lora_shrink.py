"""Segmented LoRA shrink: every slice and every segment of a layer in one launch.

    out[s, t, i, :r] = x[t, ks] @ A[i, slot(t), :r, ks].T     summed over s: buf[t, i, :r] = x[t] @ A[i, slot(t), :r].T

A slot's rank rows live in pages (:class:`loraplex.lora.backends.base.PageTable`): row ``r`` of slot ``s`` is
row ``r % PAGE`` of page ``pages[s, r // PAGE]`` of ``a`` (slices, pages, PAGE, K); the padded layout is one
page of ``MAX_RANK`` rows per slot.

``ks`` is split ``s``'s share of the input features (split-K: ``out.sum(0)`` is the
product; the expand kernel does that sum). ``r = ranks[i, slot]``; rank 0 (an
untargeted slice) and base rows (slot -1) get zeros. Reference:
:func:`loraplex.lora.backends.torch_backend.shrink_reference`.

Schedule: the work items are (tile, slice x rank block, split); a tile is at
most ``block_m`` rows of one segment (``LoRABatch.tiles``: row_start, row_end,
slot), so every item reads one adapter's A; rows of the tile past the segment
end are masked. A grid of at most ``PROGRAMS_PER_SM`` programs per SM strides
over the items of the first ``count`` tiles (``count`` may be read on the device:
a CUDA graph's padded list then launches no program for its padding). Loads of A rows beyond the slot's rank are masked, so a rank-8
adapter in a rank-64 pool reads only its 8 rows. Accumulation is in float32
(``ieee`` dot for float32 inputs, tensor cores for bf16/fp16). Every element of
``out`` is written exactly once, so it needs no zero fill, and the result is
deterministic. With ``REDUCE``, the last split of each (tile, slice, rank block)
to finish (a counter per cell, atomically incremented) also sums that cell's
partials in split order into ``buf``: still deterministic, whatever order the
splits finished in, and the expand then reads one split.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from loraplex.kernels.common import (
    INTERPRET, Launcher, dot_precision, identity_pages, num_sms, programs_per_sm, zeroed_counters)


# per-step sizes: never specialised (a new value must not compile a kernel variant mid-serving)
@triton.jit(do_not_specialize=["T", "k_per_split", "num_tiles", "splits", "target"])
def _shrink_kernel(
    x_ptr, a_ptr, out_ptr, tiles_ptr, count_ptr, ranks_ptr, pages_ptr, buf_ptr, sem_ptr,
    T, K, k_per_split, num_tiles, splits, stride_xm, num_slots, num_pages, target,
    NUM_SLICES: tl.constexpr, MAX_RANK: tl.constexpr, R_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    PAGE: tl.constexpr, MAX_PAGES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    HAS_COUNT: tl.constexpr, REDUCE: tl.constexpr, DEVICE_SPLITS: tl.constexpr,
):
    # a (slices, pages, PAGE, K), out (splits, T, slices, MAX_RANK), ranks (slices, slots), pages (slots,
    # MAX_PAGES): contiguous; x (T, K) with unit stride along K. Few arguments keep the host cost of a launch low.
    if HAS_COUNT:  # the real tiles of a padded list (CUDA graphs)
        num_tiles = tl.load(count_ptr).to(tl.int32)
    if DEVICE_SPLITS:  # split K for the real tiles (about `target` items), at most `splits` ways (REDUCE only)
        want = tl.cdiv(target, tl.maximum(num_tiles, 1) * NUM_SLICES * R_BLOCKS)
        want = tl.minimum(tl.maximum(want, 1), splits)
        k_per_split = tl.cdiv(tl.cdiv(K, want), BLOCK_K) * BLOCK_K
        splits = tl.cdiv(K, k_per_split)
    per_tile = NUM_SLICES * R_BLOCKS * splits
    for item in range(tl.program_id(0), num_tiles * per_tile, tl.num_programs(0)):
        tile = item // per_tile
        i = ((item % per_tile) // (R_BLOCKS * splits)).to(tl.int64)  # slice
        rb = (item // splits) % R_BLOCKS  # rank block
        split = (item % splits).to(tl.int64)

        row0 = tl.load(tiles_ptr + tile * 3)
        row_end = tl.load(tiles_ptr + tile * 3 + 1)
        slot = tl.load(tiles_ptr + tile * 3 + 2)
        slot0 = tl.maximum(slot, 0)
        rank = tl.load(ranks_ptr + i * num_slots + slot0)
        rank = tl.where(slot >= 0, rank, 0)

        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        m_mask = offs_m < row_end
        r_mask = offs_r < rank

        k_lo = split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        k_hi = tl.where(rb * BLOCK_R < rank, k_hi, k_lo)  # nothing to compute: the loop runs zero times

        x_base = x_ptr + offs_m[:, None] * stride_xm
        # masked by the pool's rank, not the slot's: the page indices load beside the rank instead of after it,
        # one dependent load fewer before A's (the table holds valid page numbers only, and A's loads are masked
        # by the slot's rank)
        page = tl.load(pages_ptr + slot0 * MAX_PAGES + offs_r // PAGE, mask=offs_r < MAX_RANK, other=0).to(tl.int64)
        a_base = a_ptr + ((i * num_pages + page[None, :]) * PAGE + offs_r[None, :] % PAGE) * K
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            xs = tl.load(x_base + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_base + offs_k[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            if UPCAST:  # the interpreter's tl.dot cannot take bf16; products are exact in float32 anyway
                xs = xs.to(tl.float32)
                at = at.to(tl.float32)
            acc += tl.dot(xs, at, input_precision=PRECISION)  # (BLOCK_M, BLOCK_K) @ (BLOCK_K, BLOCK_R)

        cell = (offs_m[:, None] * NUM_SLICES + i) * MAX_RANK + offs_r[None, :]
        mask = m_mask[:, None] & (offs_r[None, :] < MAX_RANK)
        tl.store(out_ptr + split * T * NUM_SLICES * MAX_RANK + cell, acc, mask=mask)
        if REDUCE:
            # The last of this (tile, slice, rank block)'s splits to finish sums them all, in split order (the
            # same sum whatever order they finished in), into buf; then resets the counter for the next launch.
            # acq_rel orders the partials' stores before the count and the loads after it.
            counter = sem_ptr + (tile * NUM_SLICES + i) * R_BLOCKS + rb
            if tl.atomic_add(counter, 1, sem="acq_rel") == splits - 1:
                total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for s in range(0, splits):
                    total += tl.load(out_ptr + s * T * NUM_SLICES * MAX_RANK + cell, mask=mask, other=0.0,
                                     cache_modifier=".cg")  # from L2: other SMs wrote them
                tl.store(buf_ptr + cell, total, mask=mask)
                tl.atomic_xchg(counter, 0, sem="relaxed")


_launch_shrink = Launcher(_shrink_kernel)

# The launch of the CUDA graph step's shrink (device splits): K steps of 256, two warps, three stages, and split
# for about four work items per SM. Swept on an H200 (benchmarks/kernel_bench.py --layer --shrink-sweep, 8B
# decoder layer, rank 16, 2026-12-01): the best of 135 settings over batch 32 and 128, one adapter and 32
# distinct, and better than the eager launch's (k128, four warps, two items per SM) in all four: 23.0 / 29.0 /
# 24.5 / 52.4 against 23.7 / 35.6 / 25.6 / 80.9 us a layer. In the decode step, beside the GEMMs, less: 6.83 against
# 6.87 ms (batch 32, 32 distinct adapters), 8.79 against 8.85 (batch 128), the rest unchanged.
GRAPH_LAUNCH = dict(block_k=256, num_warps=2, num_stages=3, programs_per_sm=4)


@functools.lru_cache(maxsize=4096)
def shrink_config(block_m: int, max_rank: int, K: int, num_tiles: int, num_slices: int,
                  split_k: Optional[int] = None, block_k: Optional[int] = None,
                  device: Optional[torch.device] = None) -> dict:
    """Tile sizes and split-K for one launch: K steps of 128, and enough K splits for about two programs per
    SM, since a decode-shaped shrink is bound by reading A and has few tiles (measured on an H100: 2.3 us
    for 32 tokens of one adapter, 3.6 us for 32 distinct adapters, 4096 inputs, rank 16)."""
    block_r = min(64, max(16, triton.next_power_of_2(max_rank)))
    r_blocks = triton.cdiv(max_rank, block_r)
    if block_k is None:
        block_k = min(128, max(16, triton.next_power_of_2(K)))
    if split_k is None:
        programs = num_tiles * num_slices * r_blocks
        want = triton.cdiv(2 * num_sms(device), max(programs, 1))
        split_k = max(1, min(want, K // (2 * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    return dict(block_r=block_r, r_blocks=r_blocks, block_k=block_k, split_k=split_k, k_per_split=k_per_split,
                num_warps=4, num_stages=3)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, ranks_t: torch.Tensor, tiles: torch.Tensor, block_m: int,
                split_k: Optional[int] = None, block_k: Optional[int] = None,
                work_tiles: Optional[int] = None, pages: Optional[torch.Tensor] = None,
                max_rank: Optional[int] = None, tile_count: Optional[torch.Tensor] = None,
                reduce: bool = True, device_splits: bool = False, split_target: Optional[int] = None,
                num_warps: Optional[int] = None, num_stages: Optional[int] = None) -> torch.Tensor:
    """``buf[t, i, :r] = x[t] @ A[i, slot(t), :r].T``, returned as float32 split-K partials
    ``(splits, T, slices, max_rank)`` whose sum over dim 0 is ``buf`` (zero for base rows and rank 0).

    x (T, K); a (slices, pages, page_rank, K); ranks_t (slices, slots) int32; tiles (num_tiles, 3) int64
    (row_start, row_end, slot), each covering at most ``block_m`` rows of one segment; ``pages`` (slots,
    max_pages) int32, the page of each rank block of each slot, and ``max_rank`` (default: the padded layout, a
    page of ``max_rank`` rows per slot: ``a`` (slices, slots, max_rank, K)). ``split_k`` / ``block_k`` override
    the heuristic (tests, tuning). ``work_tiles``: how many tiles carry rows, when the list is padded with empty
    ones (CUDA graphs), so that split-K is sized for the real work; ``tile_count`` (1,) int64 on the device: how
    many of the first tiles are real (the padding tiles then cost nothing; default: all of them). With
    ``reduce`` and more than one split, the kernel also sums the partials (the last split of each work cell to
    finish, in split order: deterministic) and returns that sum as one split ``(1, T, slices, max_rank)``, so
    the expand reads one value per element rather than one per split. ``device_splits`` (with ``reduce`` and
    ``tile_count``): the kernel picks the split count itself from the real tile count, for about
    ``split_target`` work items, at most the host's; a CUDA graph sized for one adapter then splits less when its
    batch holds many; it launches as :data:`GRAPH_LAUNCH` says. ``num_warps`` / ``num_stages`` override the
    launch's (tuning: ``benchmarks/kernel_bench.py --layer --shrink-sweep``)."""
    if x.stride(1) != 1:
        x = x.contiguous()
    T, K = x.shape
    num_slices, num_pages, page_rank, _ = a.shape
    if pages is None:
        pages = identity_pages(num_pages, a.device)
    max_rank = max_rank or page_rank
    assert a.is_contiguous() and ranks_t.is_contiguous() and pages.is_contiguous(), \
        "A stack, ranks and pages must be contiguous"
    num_tiles = tiles.shape[0]
    device_splits = device_splits and reduce and tile_count is not None
    if device_splits:  # the CUDA graph step's launch (the split count is the kernel's own): GRAPH_LAUNCH
        block_k = block_k or min(GRAPH_LAUNCH["block_k"], max(16, triton.next_power_of_2(K)))
        num_warps, num_stages = num_warps or GRAPH_LAUNCH["num_warps"], num_stages or GRAPH_LAUNCH["num_stages"]
        split_target = split_target or GRAPH_LAUNCH["programs_per_sm"] * num_sms(x.device)
    cfg = shrink_config(block_m, max_rank, K, work_tiles or num_tiles, num_slices, split_k, block_k, x.device)
    out = torch.empty(cfg["split_k"], T, num_slices, max_rank, dtype=torch.float32, device=x.device)
    if num_tiles == 0 or T == 0:
        return out.zero_()
    reduce = reduce and cfg["split_k"] > 1
    device_splits = device_splits and reduce
    buf, sem = out, out  # placeholders: never read without REDUCE
    if reduce:
        buf = torch.empty(1, T, num_slices, max_rank, dtype=torch.float32, device=x.device)
        sem = zeroed_counters("lora_shrink", num_tiles * num_slices * cfg["r_blocks"], x.device)
    items = num_tiles * num_slices * cfg["r_blocks"] * cfg["split_k"]
    grid = (min(items, programs_per_sm() * num_sms(x.device)),)
    _launch_shrink(
        grid,
        (x, a, out, tiles, tiles if tile_count is None else tile_count, ranks_t, pages, buf, sem, T, K,
         cfg["k_per_split"], num_tiles, cfg["split_k"], x.stride(0), ranks_t.shape[1], num_pages,
         split_target or 2 * num_sms(x.device)),
        dict(NUM_SLICES=num_slices, MAX_RANK=max_rank, R_BLOCKS=cfg["r_blocks"], BLOCK_M=block_m,
             BLOCK_R=cfg["block_r"], BLOCK_K=cfg["block_k"], PAGE=page_rank, MAX_PAGES=pages.shape[1],
             PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET, HAS_COUNT=tile_count is not None, REDUCE=reduce,
             DEVICE_SPLITS=device_splits),
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return buf if reduce else out

