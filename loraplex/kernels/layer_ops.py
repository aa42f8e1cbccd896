"""Fused element-wise kernels of the decoder layers: one launch where PyTorch makes five to fifteen.

A decode step of a small batch is bound by launches, not bytes: each of these ops reads a few hundred
kilobytes, and eagerly an RMSNorm is eight kernels, a rotary embedding about fourteen. Each kernel here
rounds where its PyTorch reference (the eager code in :mod:`loraplex.layers`, which is Hugging Face's) rounds,
so results equal the reference up to float32 reduction order:

* :func:`rms_norm`: ``w * (x * rsqrt(mean(x^2) + eps)).to(dtype)``, optionally after ``x = x + residual``
  (rounded to the dtype, as the model's residual addition is) with the sum written back to ``residual``, and
  before that optionally the pending LoRA delta of the one-slice projection (o_proj, down_proj) that made ``x``;
* :func:`rotary`: ``x * cos + rotate_half(x) * sin`` on the first ``rotary_dim`` features of q and k, in place;
* :func:`silu_and_mul`: ``silu(gate) * up`` of a fused ``[gate | up]`` input; optionally after the LoRA delta
  of the ``gate_up`` projection that produced it (``lora``: :class:`LoRADelta`), which the projection then
  leaves to this kernel instead of launching its own expand (the expand's arithmetic, see
  :mod:`loraplex.kernels.lora_expand`: the delta is added in float32 and rounded once, then the slot's LoRA
  bias and DoRA scale, then the activation).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from loraplex.kernels.common import Launcher


@triton.jit
def _row_delta(x, row, cols, mask, off, i, slot, parts_ptr, b_ptr, ranks_ptr, scales_ptr, pages_ptr, ext_ptr,
               ext_rows_ptr, bias_ptr, num_splits, split_stride, n_total, num_slots,
               NUM_SLICES: tl.constexpr, MAX_RANK: tl.constexpr, BLOCK_R: tl.constexpr, PAGE: tl.constexpr,
               MAX_PAGES: tl.constexpr, EXTRAS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Columns ``off + cols`` of one row (values ``x``) of a LoRA projection's output with the delta of slice ``i``
    of ``slot`` added (``lora_expand``'s arithmetic for one row), rounded to x's dtype; x itself where the slice has
    rank 0."""
    rank = tl.load(ranks_ptr + i * num_slots + slot)
    res = x
    if rank > 0:  # an untargeted slice: untouched, extras too (as the expand)
        scale = tl.load(scales_ptr + i * num_slots + slot)
        acc = tl.zeros(cols.shape, dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            h = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for s in range(0, num_splits):
                h += tl.load(parts_ptr + s * split_stride + (row * NUM_SLICES + i) * MAX_RANK + offs_r, mask=r_mask,
                             other=0.0)
            page = tl.load(pages_ptr + slot * MAX_PAGES + offs_r // PAGE, mask=r_mask, other=0).to(tl.int64)
            bt = tl.load(b_ptr + (page[:, None] * n_total + off + cols[None, :]) * PAGE + (offs_r % PAGE)[:, None],
                         mask=r_mask[:, None] & mask[None, :], other=0.0)  # (BLOCK_R, BLOCK)
            hb = h.to(bt.dtype).to(tl.float32)  # rounded to B's dtype, as the expand's dot takes it
            acc += tl.sum(hb[:, None] * bt.to(tl.float32), axis=0)
        out = x.to(tl.float32) + acc * scale
        if EXTRAS:
            e = tl.load(ext_rows_ptr + slot).to(tl.int64)
            if e >= 0:
                extra = tl.load(ext_ptr + e * 2 * n_total + off + cols, mask=mask, other=0.0)
                dora = tl.load(ext_ptr + (e * 2 + 1) * n_total + off + cols, mask=mask, other=1.0)
                out += extra
                if HAS_BIAS:
                    bias = tl.load(bias_ptr + off + cols, mask=mask, other=0.0).to(tl.float32)
                    out = (out - bias) * dora + bias
                else:
                    out = out * dora
        res = out.to(x.dtype)
    return res


# per-step sizes: never specialised (a new value must not compile a kernel variant mid-serving)
@triton.jit(do_not_specialize=["num_splits", "T"])
def _rms_norm_kernel(x_ptr, res_ptr, out_ptr, w_ptr, N, stride_x, stride_r, stride_o, eps,
                     slots_ptr, parts_ptr, b_ptr, ranks_ptr, scales_ptr, pages_ptr, ext_ptr, ext_rows_ptr,
                     bias_ptr, num_splits, T, num_slots,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr, LORA: tl.constexpr, MAX_RANK: tl.constexpr,
                     BLOCK_R: tl.constexpr, PAGE: tl.constexpr, MAX_PAGES: tl.constexpr, EXTRAS: tl.constexpr,
                     HAS_BIAS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if LORA:  # x is a one-slice LoRA projection's output whose delta is pending
        slot = tl.load(slots_ptr + row)
        if slot >= 0:
            x = _row_delta(x, row, cols, mask, 0, 0, slot, parts_ptr, b_ptr, ranks_ptr, scales_ptr, pages_ptr,
                           ext_ptr, ext_rows_ptr, bias_ptr, num_splits, T * MAX_RANK, N, num_slots, 1, MAX_RANK,
                           BLOCK_R, PAGE, MAX_PAGES, EXTRAS, HAS_BIAS)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    h = (xf * (1.0 / tl.sqrt(var + eps))).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * h).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_cos, HQ, HK, HALF: tl.constexpr, HALF_PAD: tl.constexpr, H_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF_PAD)
    d_ok = d < HALF
    dt = q_ptr.dtype.element_ty
    # cos / sin rows hold [f | f]: the first half serves both halves, rounded to q's dtype as the reference
    c = tl.load(cos_ptr + pos * stride_cos + d, mask=d_ok, other=0.0).to(dt).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_cos + d, mask=d_ok, other=0.0).to(dt).to(tl.float32)
    heads = tl.arange(0, H_PAD)
    for which in tl.static_range(2):
        if which == 0:
            base = q_ptr + t * stride_qt
            n_heads = HQ
            stride_h = stride_qh
        else:
            base = k_ptr + t * stride_kt
            n_heads = HK
            stride_h = stride_kh
        m = (heads < n_heads)[:, None] & d_ok[None, :]
        p1 = base + heads[:, None] * stride_h + d[None, :]
        x1 = tl.load(p1, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + HALF, mask=m, other=0.0).to(tl.float32)
        o1 = (x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32)
        o2 = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
        tl.store(p1, o1.to(dt), mask=m)
        tl.store(p1 + HALF, o2.to(dt), mask=m)


# per-step sizes: never specialised (a new value must not compile a kernel variant mid-serving)
@triton.jit(do_not_specialize=["num_splits", "T"])
def _silu_and_mul_kernel(x_ptr, out_ptr, N, stride_x, stride_o,
                         slots_ptr, parts_ptr, b_ptr, ranks_ptr, scales_ptr, pages_ptr, ext_ptr, ext_rows_ptr,
                         bias_ptr, num_splits, T, num_slots,
                         BLOCK: tl.constexpr, LORA: tl.constexpr, MAX_RANK: tl.constexpr, BLOCK_R: tl.constexpr,
                         PAGE: tl.constexpr, MAX_PAGES: tl.constexpr, EXTRAS: tl.constexpr, HAS_BIAS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0)
    if LORA:
        slot = tl.load(slots_ptr + row)
        if slot >= 0:
            split_stride = T * 2 * MAX_RANK
            g = _row_delta(g, row, cols, mask, 0, 0, slot, parts_ptr, b_ptr, ranks_ptr, scales_ptr, pages_ptr,
                           ext_ptr, ext_rows_ptr, bias_ptr, num_splits, split_stride, 2 * N, num_slots, 2, MAX_RANK,
                           BLOCK_R, PAGE, MAX_PAGES, EXTRAS, HAS_BIAS)
            u = _row_delta(u, row, cols, mask, N, 1, slot, parts_ptr, b_ptr, ranks_ptr, scales_ptr, pages_ptr,
                           ext_ptr, ext_rows_ptr, bias_ptr, num_splits, split_stride, 2 * N, num_slots, 2, MAX_RANK,
                           BLOCK_R, PAGE, MAX_PAGES, EXTRAS, HAS_BIAS)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * u.to(tl.float32)).to(g.dtype), mask=mask)


class LoRADelta(NamedTuple):
    """A LoRA projection's delta, not yet added to its output (``y += parts.sum(0) @ B.T * scale`` per row's
    slot, then the slot's extras), for a kernel that consumes the output to add itself: the shrink's float32
    split-K partials ``parts`` (splits, T, slices, max_rank), the stack's ``b`` (pages, sum(slices), page_rank),
    ``pages`` (slots, max_pages) int32, ``ranks`` / ``scales`` (slices, slots) int32 / float32, each row's slot
    ``token_slots`` (T,) int64 (-1: no adapter), the extras ``ext`` (rows, 2, sum(slices)) float32 and ``ext_rows``
    (slots,) int32 or None, and the base layer's ``bias`` or None."""

    parts: torch.Tensor
    b: torch.Tensor
    pages: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    token_slots: torch.Tensor
    ext: Optional[torch.Tensor]
    ext_rows: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


_launch_rms = Launcher(_rms_norm_kernel)
_launch_rotary = Launcher(_rotary_kernel)
_launch_silu = Launcher(_silu_and_mul_kernel)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None,
             lora: Optional["LoRADelta"] = None) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (..., N); with ``residual`` (same shape), of ``x + residual``,
    which is also written into ``residual``. Returns a new tensor in ``x``'s dtype. With ``lora``, ``x`` is first
    the output of the one-slice LoRA projection that made it plus that projection's pending delta (``x`` itself
    is not written)."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows == 0:
        return out.view(x.shape)
    r2 = x2
    if residual is not None:
        r2 = residual.view(-1, N)
        assert r2.stride(-1) == 1 and r2.shape == x2.shape, "residual must match x and be contiguous by row"
    block = triton.next_power_of_2(N)
    common = (x2, r2, out, weight, N, x2.stride(0), r2.stride(0), out.stride(0), float(eps))
    warps = min(16, max(1, block // 256))
    if lora is None:
        _launch_rms((rows,), common + (x2, x2, x2, x2, x2, x2, x2, x2, x2, 0, 0, 0),
                    dict(HAS_RES=residual is not None, BLOCK=block, LORA=False, MAX_RANK=1, BLOCK_R=1, PAGE=1,
                         MAX_PAGES=1, EXTRAS=False, HAS_BIAS=False), num_warps=warps)
        return out.view(x.shape)
    parts, b = lora.parts, lora.b
    assert parts.is_contiguous() and parts.shape[1:3] == (rows, 1) and b.shape[1] == N \
        and lora.token_slots.shape == (rows,), "a one-slice delta of x's rows and width"
    extras = lora.ext is not None
    _launch_rms((rows,), common + (lora.token_slots, parts, b, lora.ranks, lora.scales, lora.pages,
                                   lora.ext if extras else x2, lora.ext_rows if extras else x2,
                                   lora.bias if lora.bias is not None else x2, parts.shape[0], rows, lora.ranks.shape[1]),
                dict(HAS_RES=residual is not None, BLOCK=block, LORA=True, MAX_RANK=parts.shape[3],
                     BLOCK_R=8, PAGE=b.shape[2], MAX_PAGES=lora.pages.shape[1], EXTRAS=extras,
                     HAS_BIAS=extras and lora.bias is not None), num_warps=warps)
    return out.view(x.shape)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           rotary_dim: int) -> None:
    """Rotate the first ``rotary_dim`` features of every head of ``q`` (T, HQ, D) and ``k`` (T, HK, D) in
    place by the angles of ``positions`` (T,), from the tables ``cos`` / ``sin`` (max_position, rotary_dim)."""
    T = q.shape[0]
    if T == 0:
        return
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1 and sin.stride() == cos.stride()
    half = rotary_dim // 2
    _launch_rotary((T,), (q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                          cos.stride(0), q.shape[1], k.shape[1]),
                   dict(HALF=half, HALF_PAD=triton.next_power_of_2(half),
                        H_PAD=triton.next_power_of_2(max(q.shape[1], k.shape[1]))), num_warps=4)


def silu_and_mul(x: torch.Tensor, lora: Optional[LoRADelta] = None) -> torch.Tensor:
    """(T, 2N) ``[gate | up]`` -> (T, N) ``silu(gate) * up``; with ``lora``, of ``[gate | up]`` plus the delta of
    the two-slice (gate, up) LoRA projection that produced ``x``."""
    N = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], N, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out.view(*x.shape[:-1], N)
    if lora is None:
        block = min(1024, triton.next_power_of_2(N))
        _launch_silu((x2.shape[0], triton.cdiv(N, block)),
                     (x2, out, N, x2.stride(0), out.stride(0), x2, x2, x2, x2, x2, x2, x2, x2, x2, 0, 0, 0),
                     dict(BLOCK=block, LORA=False, MAX_RANK=1, BLOCK_R=1, PAGE=1, MAX_PAGES=1, EXTRAS=False,
                          HAS_BIAS=False), num_warps=4)
        return out.view(*x.shape[:-1], N)
    parts, b, pages = lora.parts, lora.b, lora.pages
    assert parts.is_contiguous() and parts.shape[1:3] == (x2.shape[0], 2) and b.shape[1] == 2 * N \
        and lora.token_slots.shape == (x2.shape[0],), "a two-slice delta of x's rows and width"
    extras = lora.ext is not None
    max_rank = parts.shape[3]
    block = min(512, triton.next_power_of_2(N))  # a (rank block, columns) tile of B per step: 512 columns
    _launch_silu((x2.shape[0], triton.cdiv(N, block)),
                 (x2, out, N, x2.stride(0), out.stride(0), lora.token_slots, parts, b, lora.ranks, lora.scales, pages,
                  lora.ext if extras else x2, lora.ext_rows if extras else x2,
                  lora.bias if lora.bias is not None else x2, parts.shape[0], parts.shape[1], lora.ranks.shape[1]),
                 dict(BLOCK=block, LORA=True, MAX_RANK=max_rank, BLOCK_R=min(16, triton.next_power_of_2(max_rank)),
                      PAGE=b.shape[2], MAX_PAGES=pages.shape[1], EXTRAS=extras,
                      HAS_BIAS=extras and lora.bias is not None), num_warps=4)
    return out.view(*x.shape[:-1], N)
