"""Segmented LoRA expand: every slice and every segment of a layer in one launch, in place.

    y[t, off_i:off_i+n_i] += buf[t, i, :r] @ B[slot(t), off_i:off_i+n_i, :r].T * scale[i, slot(t)]

with ``buf = parts.sum(0)`` (the shrink kernel's split-K partials, summed here),
``r = ranks[i, slot]``; rows of base segments (slot -1) and slices of rank 0 are
not touched. B (pages, sum(n_i), PAGE) holds each slot's rank rows in pages
(:class:`loraplex.lora.backends.base.PageTable`): rank ``r`` of slot ``s`` is
``B[pages[s, r // PAGE], :, r % PAGE]``; the padded layout is one page of
``MAX_RANK`` per slot. With per-slot *extras* (``ext`` (rows, 2, sum(n_i))
float32 and ``ext_rows`` (slots,) int32, -1 for none), a row of a slot with an
extras row ``e`` then becomes

    y = (y + ext[e, 0] - bias) * ext[e, 1] + bias

(LoRA bias ``scaling * lora_B.bias`` in row 0, DoRA's per-channel scale in row 1,
``bias`` the base layer's bias or 0), so DoRA and LoRA bias cost no extra launch
and fit in CUDA graphs. The slices sit side by side along B's dim 1. Reference:
:func:`loraplex.lora.backends.torch_backend.expand_reference`.

Schedule: the work items are (tile, slice, output block); a tile is at most
``block_m`` rows of one segment (``LoRABatch.tiles``). A grid of at most
``PROGRAMS_PER_SM`` programs per SM strides over the items of the first
``count`` tiles, where ``count`` may be read on the device (``tile_count``): a
CUDA graph's work list is padded to its batch size, and its padding tiles then
cost no program at all, where one program per item made a one-adapter decode
step launch thousands of programs that only exited. Items of base rows (slot
-1), of rank-0 slices and past a slice's width do nothing. ``buf`` is rounded
to B's dtype before the dot (as the reference, whose ``buf`` is in the input
dtype), the product is accumulated in float32, scaled, and added to ``y`` in
float32 before one rounding.

Split in two (``delta=True``, then :func:`lora_add_delta`): the expand writes the scaled products alone
into a float32 buffer, and a second kernel adds them with the extras epilogue, so that the first half can
run beside the GEMM that writes ``y`` (the Triton backend's side stream).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from loraplex import envs
from loraplex.kernels.common import INTERPRET, Launcher, dot_precision, identity_pages, num_sms, programs_per_sm


# per-step sizes: never specialised (a new value must not compile a kernel variant mid-serving)
@triton.jit(do_not_specialize=["num_splits", "T", "num_tiles"])
def _expand_kernel(
    y_ptr, parts_ptr, b_ptr, tiles_ptr, count_ptr, ranks_ptr, scales_ptr, slice_ptr, pages_ptr, ext_ptr,
    ext_rows_ptr, bias_ptr, num_splits, T, num_tiles, stride_ym, n_total, num_slots,
    NUM_SLICES: tl.constexpr, MAX_RANK: tl.constexpr, N_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PAGE: tl.constexpr,
    MAX_PAGES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, EXTRAS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_COUNT: tl.constexpr, DELTA: tl.constexpr, B_LOAD: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    # parts (splits, T, slices, MAX_RANK), b (pages, n_total, PAGE), ranks / scales (slices, slots), pages
    # (slots, MAX_PAGES): contiguous; y (T, n_total) with unit stride along columns. Few arguments keep
    # launches cheap.
    if HAS_COUNT:  # the real tiles of a padded list (CUDA graphs)
        num_tiles = tl.load(count_ptr).to(tl.int32)
    per_tile = NUM_SLICES * N_BLOCKS
    split_stride = T * NUM_SLICES * MAX_RANK
    for item in range(tl.program_id(0), num_tiles * per_tile, tl.num_programs(0)):
        tile = item // per_tile
        i = (item % per_tile) // N_BLOCKS  # slice
        nb = item % N_BLOCKS  # output block within the slice
        slot = tl.load(tiles_ptr + tile * 3 + 2)
        rank = tl.load(ranks_ptr + i * num_slots + tl.maximum(slot, 0))
        width = tl.load(slice_ptr + i * 2 + 1)
        if (slot >= 0) & (rank > 0) & (nb * BLOCK_N < width):
            row0 = tl.load(tiles_ptr + tile * 3)
            row_end = tl.load(tiles_ptr + tile * 3 + 1)
            offset = tl.load(slice_ptr + i * 2)
            scale = tl.load(scales_ptr + i * num_slots + slot)
            if ALIGNED:  # every slice's offset and width a multiple of 8: rows of y go as vector stores
                offset = tl.multiple_of(offset, 8)
                width = tl.multiple_of(width, 8)

            offs_m = row0 + tl.arange(0, BLOCK_M)
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            m_mask = offs_m < row_end
            n_mask = offs_n < width
            cols = offset + offs_n  # columns of y (and of B's last dim)

            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, rank, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                r_mask = offs_r < rank
                p_ptrs = parts_ptr + (offs_m[:, None] * NUM_SLICES + i) * MAX_RANK + offs_r[None, :]
                h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                if B_LOAD == 0:  # masked by rank, and a page index per rank value: every element a load of its own
                    for s in range(0, num_splits):
                        h += tl.load(p_ptrs + s * split_stride, mask=m_mask[:, None] & r_mask[None, :], other=0.0)
                    page = tl.load(pages_ptr + slot * MAX_PAGES + offs_r // PAGE, mask=r_mask, other=0).to(tl.int64)
                    bt = tl.load(b_ptr + (page[:, None] * n_total + cols[None, :]) * PAGE + (offs_r % PAGE)[:, None],
                                 mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # (BLOCK_R, BLOCK_N)
                else:  # the partials masked by row (and the buffer's width) only, so a row's rank values load as
                    # vectors (the shrink wrote zeros past the rank, dropped here anyway); B a page at a time
                    for s in range(0, num_splits):
                        h += tl.load(p_ptrs + s * split_stride, mask=m_mask[:, None] & (offs_r < MAX_RANK)[None, :],
                                     other=0.0)
                    h = tl.where(r_mask[None, :], h, 0.0)
                    bt = _load_b(b_ptr, pages_ptr, slot, r0, rank, cols, n_mask, n_total, MAX_PAGES, PAGE, BLOCK_R,
                                 B_LOAD)
                if UPCAST:  # the interpreter's tl.dot cannot take bf16: round as the GPU does, multiply in float32
                    hb = h.to(bt.dtype).to(tl.float32)
                    bt = bt.to(tl.float32)
                else:
                    hb = h.to(bt.dtype)
                acc += tl.dot(hb, bt, input_precision=PRECISION)

            if DELTA:  # y is a float32 buffer of deltas, which lora_add_delta adds later
                tl.store(y_ptr + offs_m[:, None] * stride_ym + cols[None, :], acc * scale,
                         mask=m_mask[:, None] & n_mask[None, :])
            else:
                add_delta(y_ptr, acc, scale, offs_m, cols, m_mask, n_mask, stride_ym, slot, ext_ptr, ext_rows_ptr,
                          bias_ptr, n_total, EXTRAS, HAS_BIAS)


@triton.jit
def _load_b(b_ptr, pages_ptr, slot, r0, rank, cols, n_mask, n_total, MAX_PAGES: tl.constexpr, PAGE: tl.constexpr,
            BLOCK_R: tl.constexpr, B_LOAD: tl.constexpr):
    """B's rank rows r0..r0 + BLOCK_R of ``slot`` at columns ``cols``, as (BLOCK_R, BLOCK_N), zero past ``rank``.
    B is (pages, n_total, PAGE): a page's PAGE rank values of one column are contiguous. Each page index is
    loaded as a scalar and the loads are masked by column (and whole page) only, so the compiler loads a
    column's rank values as one vector; a tensor of loaded page indices, or a mask that changes along the
    rank, would make every element a load of its own. Rank values past ``rank`` are zeroed after the load
    (within an adapter's pages they hold zeros anyway). A block lies in one page (``B_LOAD`` 1: BLOCK_R divides
    PAGE) or spans two whole pages (2: BLOCK_R == 2 * PAGE)."""
    if B_LOAD == 1:
        page = tl.load(pages_ptr + slot * MAX_PAGES + r0 // PAGE).to(tl.int64)
        offs = r0 % PAGE + tl.arange(0, BLOCK_R)
        bt = tl.load(b_ptr + (page * n_total + cols[:, None]) * PAGE + offs[None, :], mask=n_mask[:, None],
                     other=0.0)
    else:
        tl.static_assert(BLOCK_R == 2 * PAGE, "B_LOAD 2: a rank block spans two pages")
        offs = tl.arange(0, PAGE)
        p0 = tl.load(pages_ptr + slot * MAX_PAGES + r0 // PAGE).to(tl.int64)
        lo = tl.load(b_ptr + (p0 * n_total + cols[:, None]) * PAGE + offs[None, :], mask=n_mask[:, None], other=0.0)
        # the second page, or past the slot's pages any page of the pool (the table holds valid page numbers
        # only): read in bounds, then zeroed below with every rank value past the rank
        p1 = tl.load(pages_ptr + slot * MAX_PAGES + tl.minimum(r0 // PAGE + 1, MAX_PAGES - 1)).to(tl.int64)
        hi = tl.load(b_ptr + (p1 * n_total + cols[:, None]) * PAGE + offs[None, :], mask=n_mask[:, None], other=0.0)
        bt = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (lo.shape[0], BLOCK_R))
    bt = tl.where((r0 + tl.arange(0, BLOCK_R) < rank)[None, :], bt, 0.0)
    return tl.trans(bt)  # (BLOCK_R, BLOCK_N)


@triton.jit
def apply_extras(out, e, cols, mask, ext_ptr, bias_ptr, n_total, HAS_BIAS: tl.constexpr):
    """``out`` (float32, columns ``cols`` of a layer's output, broadcast over its rows) with extras row ``e``:
    ``(out + ext[e, 0] - bias) * ext[e, 1] + bias``, the LoRA bias and the DoRA scale around the base bias."""
    extra = tl.load(ext_ptr + e * 2 * n_total + cols, mask=mask, other=0.0)
    dora = tl.load(ext_ptr + (e * 2 + 1) * n_total + cols, mask=mask, other=1.0)
    out += extra
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        out = (out - bias) * dora + bias
    else:
        out = out * dora
    return out


@triton.jit
def add_delta(y_ptr, acc, scale, offs_m, cols, m_mask, n_mask, stride_ym, slot, ext_ptr, ext_rows_ptr, bias_ptr,
              n_total, EXTRAS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The expand's epilogue: ``y[offs_m, cols] += acc * scale`` in float32, then the
    slot's extras row (LoRA bias, DoRA scale) when it has one, and one rounding into ``y``."""
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + cols[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    out = y.to(tl.float32) + acc * scale
    if EXTRAS:
        e = tl.load(ext_rows_ptr + slot).to(tl.int64)
        if e >= 0:  # this slot's adapter has a LoRA bias or DoRA (here, or in other layers: then 0 and 1)
            out = apply_extras(out, e, cols[None, :], n_mask[None, :], ext_ptr, bias_ptr, n_total, HAS_BIAS)
    tl.store(y_ptrs, out.to(y.dtype), mask=mask)


@triton.jit
def _add_kernel(y_ptr, d_ptr, slots_ptr, ranks_ptr, slice_ptr, ext_ptr, ext_rows_ptr, bias_ptr, stride_ym, stride_dm,
                n_total, num_slots, BLOCK_N: tl.constexpr, EXTRAS: tl.constexpr, HAS_BIAS: tl.constexpr):
    # one program per (row, slice, output block): the rows and slices the expand would have touched
    t = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1)
    nb = tl.program_id(2)
    slot = tl.load(slots_ptr + t).to(tl.int32)
    offset = tl.load(slice_ptr + i * 2)
    width = tl.load(slice_ptr + i * 2 + 1)
    rank = tl.load(ranks_ptr + i * num_slots + tl.maximum(slot, 0))
    if (slot >= 0) & (rank > 0) & (nb * BLOCK_N < width):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < width
        cols = offset + offs_n
        d = tl.load(d_ptr + t * stride_dm + cols, mask=n_mask, other=0.0)
        add_delta(y_ptr + t * stride_ym, d[None, :], 1.0, tl.arange(0, 1), cols, tl.arange(0, 1) < 1, n_mask, 0,
                  slot, ext_ptr, ext_rows_ptr, bias_ptr, n_total, EXTRAS, HAS_BIAS)


@triton.jit
def fold_delta(x, d_row_ptr, cols, mask, slot, rank, ext_ptr, ext_rows_ptr, bias_ptr, n_total,
               EXTRAS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``x``, a block of one row of a layer's output (columns ``cols``, in its dtype), with the layer's LoRA delta
    folded in as :func:`lora_add_delta` would have written it: when the row's ``slot`` >= 0 has ``rank`` > 0 in
    the slice, ``x + d`` in float32, then the slot's extras, one rounding; else ``x`` as it is. For the kernels
    that read a layer's output next (the fused norm, SiLU-and-mul), so that the add costs no launch."""
    on = (slot >= 0) & (rank > 0)
    d = tl.load(d_row_ptr + cols, mask=mask, other=0.0)  # every row of the buffer exists; unused ones are dropped
    out = x.to(tl.float32) + d
    if EXTRAS:
        e = tl.load(ext_rows_ptr + tl.maximum(slot, 0)).to(tl.int64)
        if on & (e >= 0):
            out = apply_extras(out, e, cols, mask, ext_ptr, bias_ptr, n_total, HAS_BIAS)
    return tl.where(on, out.to(x.dtype), x)


_launch_expand = Launcher(_expand_kernel)
_launch_add = Launcher(_add_kernel)
# B loaded a page at a time (see _load_b): compiled for sm_90, 2 vector loads per thread for a 16 x 128 block
# of B in place of 16 two-byte loads. H200 (2026-12-01): the 8B layer's expands into a delta with 32 distinct
# adapters 40.0 against 48.8 us at batch 32, 134 against 163 at 128; the decode step 7.15 against 7.54 ms.
# LORAPLEX_LORA_VECTOR_B=0 loads B element by element.
VECTOR_B = envs.LORAPLEX_LORA_VECTOR_B


@functools.lru_cache(maxsize=4096)
def expand_config(block_m: int, max_rank: int, max_width: int, num_tiles: int, num_slices: int,
                  device: Optional[torch.device] = None) -> dict:
    """Output block width: 256 columns for prefill tiles (32 rows), 128 for decode tiles (16 rows), halved
    (down to 64) while that leaves fewer programs than SMs. Measured on an H100 at 4096 outputs, rank 16:
    6.6 us for 32 distinct decode tokens; 22 us for 4 prompts of 512 tokens (64-row tiles took 36 us)."""
    block_r = min(64, max(16, triton.next_power_of_2(max_rank)))
    block_n = 256 if block_m >= 32 else 128
    while block_n > 64 and num_tiles * num_slices * triton.cdiv(max_width, block_n) < num_sms(device):
        block_n //= 2
    block_n = min(block_n, max(16, triton.next_power_of_2(max_width)))
    return dict(block_r=block_r, block_n=block_n, n_blocks=triton.cdiv(max_width, block_n), num_warps=4)


def lora_expand(y: torch.Tensor, parts: torch.Tensor, b: torch.Tensor, ranks_t: torch.Tensor,
                scales_t: torch.Tensor, slice_meta: torch.Tensor, max_width: int, tiles: torch.Tensor,
                block_m: int, extras: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                bias: Optional[torch.Tensor] = None, pages: Optional[torch.Tensor] = None,
                tile_count: Optional[torch.Tensor] = None, delta: bool = False,
                block_n: Optional[int] = None, num_warps: Optional[int] = None,
                vector_b: Optional[bool] = None, aligned: bool = False) -> None:
    """``y[t, off_i:off_i+n_i] += parts.sum(0)[t, i, :r] @ B[slot(t), off_i:off_i+n_i, :r].T * scale[i, slot(t)]``.

    y (T, sum(n_i)), updated in place; parts (splits, T, slices, max_rank), any float dtype; b (pages,
    sum(n_i), page_rank); ranks_t (slices, slots) int32; scales_t (slices, slots) float32; slice_meta
    (slices, 2) int32 (offset, width); ``max_width`` = max(n_i); tiles as for :func:`lora_shrink` (any
    tile height: ``LoRABatch.expand_tiles``); ``pages`` (slots, max_pages) int32 (default: the padded
    layout, b (slots, sum(n_i), max_rank)). ``extras``: (ext (rows, 2, sum(n_i)) float32, ext_rows (slots,)
    int32), the per-slot LoRA bias and DoRA scale applied after the delta (see the module docstring);
    ``bias`` (sum(n_i),): the base layer's bias, which DoRA's rescaling leaves out. ``tile_count`` (1,) int64 on
    the device: how many of the first tiles are real (a CUDA graph's padded list; default: all of them).
    ``delta``: y is instead a float32 buffer that receives the scaled products alone (``= acc * scale``,
    no extras), for :func:`lora_add_delta` to add later: the expand may then run beside the base GEMM that
    writes the layer's output (the Triton backend's side stream). ``block_n`` / ``num_warps`` override the
    tiling (tuning: ``benchmarks/kernel_bench.py --layer --sweep``). ``vector_b``: load B a page at a time
    with scalar page indices, so that a column's rank values go as one vector load (default: on;
    ``LORAPLEX_LORA_VECTOR_B=0`` turns it off); with it, ``aligned`` (every slice's offset and
    width a multiple of 8, :attr:`LoRAStack.aligned`) lets rows of ``y`` and of the partials go as vector
    accesses too."""
    if y.stride(1) != 1:
        raise ValueError(f"lora_expand updates y in place and needs unit column stride, got strides {y.stride()}")
    assert not delta or y.dtype == torch.float32, "a delta buffer is float32"
    parts = parts if parts.is_contiguous() else parts.contiguous()
    if pages is None:
        pages = identity_pages(b.shape[0], b.device)
    assert b.is_contiguous() and ranks_t.is_contiguous() and scales_t.is_contiguous() and pages.is_contiguous() \
        and parts.shape[3] <= pages.shape[1] * b.shape[2], \
        "B stack, ranks, scales and pages contiguous; parts (splits, T, slices, max_rank)"
    num_tiles = tiles.shape[0]
    num_slices = parts.shape[2]
    if num_tiles == 0 or y.shape[0] == 0:
        return
    max_rank = parts.shape[3]
    cfg = expand_config(block_m, max_rank, max_width, num_tiles, num_slices, y.device)
    page = b.shape[2]
    b_load = 0
    if VECTOR_B if vector_b is None else vector_b:
        if page % cfg["block_r"] == 0:
            b_load = 1
        elif 2 * page >= 16 and (2 * page) & (2 * page - 1) == 0:  # rank blocks of two whole pages
            b_load, cfg = 2, dict(cfg, block_r=2 * page)
    if block_n is not None or num_warps is not None:
        cfg = dict(cfg, num_warps=num_warps or cfg["num_warps"])
        if block_n is not None:
            cfg.update(block_n=block_n, n_blocks=triton.cdiv(max_width, block_n))
    grid = (min(num_tiles * num_slices * cfg["n_blocks"], programs_per_sm() * num_sms(y.device)),)
    ext, ext_rows = extras if extras is not None else (y, y)  # placeholders: never read without EXTRAS
    if extras is not None:
        assert ext.shape[1:] == (2, b.shape[1]) and ext.dtype == torch.float32 and ext.is_contiguous() \
            and ext_rows.shape == (ranks_t.shape[1],), "extras: (rows, 2, sum(slices)) float32 and (slots,) rows"
    _launch_expand(
        grid,
        (y, parts, b, tiles, tiles if tile_count is None else tile_count, ranks_t, scales_t, slice_meta, pages, ext,
         ext_rows, y if bias is None else bias, parts.shape[0], parts.shape[1], num_tiles, y.stride(0), b.shape[1],
         ranks_t.shape[1]),
        dict(NUM_SLICES=num_slices, MAX_RANK=max_rank, N_BLOCKS=cfg["n_blocks"], BLOCK_M=block_m,
             BLOCK_N=cfg["block_n"], BLOCK_R=cfg["block_r"], PAGE=b.shape[2], MAX_PAGES=pages.shape[1],
             PRECISION=dot_precision(b.dtype), UPCAST=INTERPRET,
             EXTRAS=extras is not None and not delta, HAS_BIAS=extras is not None and bias is not None and not delta,
             HAS_COUNT=tile_count is not None, DELTA=delta, B_LOAD=b_load, ALIGNED=aligned and b_load != 0),
        num_warps=cfg["num_warps"],
    )


def lora_add_delta(y: torch.Tensor, delta: torch.Tensor, token_slots: torch.Tensor, ranks_t: torch.Tensor,
                   slice_meta: torch.Tensor, max_width: int,
                   extras: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                   bias: Optional[torch.Tensor] = None) -> None:
    """The second half of an expand made with ``delta=True``: ``y[t, cols of slice i] += delta[t, those cols]``
    in float32, then the slot's extras, one rounding, for the rows and slices the expand writes (slot of row
    ``t`` = ``token_slots[t]`` >= 0, rank > 0); every other element of ``y`` is left as it is. Equal bit for bit
    to the in-place :func:`lora_expand`. y (T, sum(n_i)); delta (T, sum(n_i)) float32; the rest as there."""
    T = y.shape[0]
    if T == 0:
        return
    assert y.stride(1) == 1 and delta.stride(1) == 1 and delta.dtype == torch.float32 and delta.shape == y.shape
    block_n = min(1024, max(16, triton.next_power_of_2(max_width)))
    ext, ext_rows = extras if extras is not None else (y, y)
    _launch_add((T, slice_meta.shape[0], triton.cdiv(max_width, block_n)),
                (y, delta, token_slots, ranks_t, slice_meta, ext, ext_rows, y if bias is None else bias, y.stride(0),
                 delta.stride(0), y.shape[1], ranks_t.shape[1]),
                dict(BLOCK_N=block_n, EXTRAS=extras is not None, HAS_BIAS=extras is not None and bias is not None),
                num_warps=4)


class PendingDelta(NamedTuple):
    """A layer's LoRA delta, expanded into a float32 buffer beside its base GEMM and not yet added: the
    arguments of :func:`lora_add_delta` but ``y``. The kernel that reads the layer's output next may fold it in
    (``layer_ops.rms_norm`` / ``silu_and_mul``: :func:`fold_delta`); :meth:`apply` adds it where one cannot."""

    delta: torch.Tensor  # (T, sum(n_i)) float32
    token_slots: torch.Tensor  # (T,) int64: the slot of each row, -1 for none
    ranks_t: torch.Tensor  # (slices, slots) int32
    slice_meta: torch.Tensor  # (slices, 2) int32: offset, width
    max_width: int
    extras: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    bias: Optional[torch.Tensor] = None

    def apply(self, y: torch.Tensor) -> None:
        """``y`` (T, sum(n_i)) += the delta, as :func:`lora_add_delta`."""
        lora_add_delta(y, self.delta, self.token_slots, self.ranks_t, self.slice_meta, self.max_width, self.extras,
                       self.bias)

    def added_to(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (the layer's output, or a view of it with the same rows and width) with the delta added: ``x``
        itself when contiguous (a layer's output is), else a contiguous copy of it."""
        x = x.contiguous()
        self.apply(x.view(-1, x.shape[-1]))
        return x

    def fold_args(self) -> tuple:
        """The pointer arguments of the kernels that fold it: delta, its row stride, slots, ranks, ext, ext_rows, bias."""
        ext, ext_rows = self.extras if self.extras is not None else (self.delta, self.token_slots)
        return (self.delta, self.delta.stride(0), self.token_slots, self.ranks_t, ext, ext_rows,
                self.bias if self.bias is not None else self.delta)

    def fold_flags(self) -> dict:
        return dict(EXTRAS=self.extras is not None, HAS_BIAS=self.extras is not None and self.bias is not None)
