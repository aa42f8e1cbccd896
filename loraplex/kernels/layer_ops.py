"""Fused element-wise kernels of the decoder layers: one launch where PyTorch makes five to fifteen.

A decode step of a small batch is bound by launches, not bytes: each of these ops reads a few hundred
kilobytes, and eagerly an RMSNorm is eight kernels, a rotary embedding about fourteen. Each kernel here
rounds where its PyTorch reference (the eager code in :mod:`loraplex.layers`, which is Hugging Face's) rounds,
so results equal the reference up to float32 reduction order:

* :func:`rms_norm`: ``w * (x * rsqrt(mean(x^2) + eps)).to(dtype)``, optionally after ``x = x + residual``
  (rounded to the dtype, as the model's residual addition is) with the sum written back to ``residual``;
* :func:`rotary`: ``x * cos + rotate_half(x) * sin`` on the first ``rotary_dim`` features of q and k, in place,
  and optionally the rotated k and the v written into the paged KV cache at the step's slot mapping;
* :func:`silu_and_mul`: ``silu(gate) * up`` of a fused ``[gate | up]`` input.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from loraplex.kernels.common import Launcher
from loraplex.kernels.lora_expand import PendingDelta, fold_delta


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, out_ptr, w_ptr, N, stride_x, stride_r, stride_o, eps,
                     d_ptr, stride_d, slots_ptr, ranks_ptr, ext_ptr, ext_rows_ptr, bias_ptr,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr, EXTRAS: tl.constexpr,
                     HAS_BIAS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:  # the LoRA delta of the one-slice layer that wrote x, added first (as lora_add_delta would)
        slot = tl.load(slots_ptr + row).to(tl.int32)
        rank = tl.load(ranks_ptr + tl.maximum(slot, 0))
        x = fold_delta(x, d_ptr + row * stride_d, cols, mask, slot, rank, ext_ptr, ext_rows_ptr, bias_ptr, N,
                       EXTRAS, HAS_BIAS)
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
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
                   stride_cos, HQ, HK, d_ptr, stride_d, slots_ptr, ranks_ptr, ext_ptr, ext_rows_ptr, bias_ptr,
                   num_slots, col_k, col_v, n_total,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr, H_PAD: tl.constexpr,
                   CACHE: tl.constexpr, HEAD_DIM: tl.constexpr, REST_PAD: tl.constexpr, D_PAD: tl.constexpr,
                   HAS_DELTA: tl.constexpr, EXTRAS: tl.constexpr, HAS_BIAS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF_PAD)
    d_ok = d < HALF
    dt = q_ptr.dtype.element_ty
    # cos / sin rows hold [f | f]: the first half serves both halves, rounded to q's dtype as the reference
    c = tl.load(cos_ptr + pos * stride_cos + d, mask=d_ok, other=0.0).to(dt).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_cos + d, mask=d_ok, other=0.0).to(dt).to(tl.float32)
    heads = tl.arange(0, H_PAD)
    if HAS_DELTA:  # the qkv layer's pending LoRA delta (slices q, k, v at columns 0, col_k, col_v of its output)
        lslot = tl.load(slots_ptr + t).to(tl.int32)
        d_row = d_ptr + t * stride_d
    if CACHE:  # this token's cache slot, once per head row (negative: none, as a padding row may have)
        slot = tl.load(slot_ptr + t + heads * 0).to(tl.int64)[:, None]
        keep = slot >= 0
        cdt = kc_ptr.dtype.element_ty
        k_row = kc_ptr + slot * stride_cs
        v_row = vc_ptr + slot * stride_cs
    for which in tl.static_range(2):
        if which == 0:
            base = q_ptr + t * stride_qt
            n_heads = HQ
            stride_h = stride_qh
            col0 = 0
        else:
            base = k_ptr + t * stride_kt
            n_heads = HK
            stride_h = stride_kh
            col0 = col_k
        m = (heads < n_heads)[:, None] & d_ok[None, :]
        p1 = base + heads[:, None] * stride_h + d[None, :]
        x1 = tl.load(p1, mask=m, other=0.0)
        x2 = tl.load(p1 + HALF, mask=m, other=0.0)
        if HAS_DELTA:
            rank = tl.load(ranks_ptr + which * num_slots + tl.maximum(lslot, 0))
            c1 = col0 + heads[:, None] * HEAD_DIM + d[None, :]
            x1 = fold_delta(x1, d_row, c1, m, lslot, rank, ext_ptr, ext_rows_ptr, bias_ptr, n_total, EXTRAS, HAS_BIAS)
            x2 = fold_delta(x2, d_row, c1 + HALF, m, lslot, rank, ext_ptr, ext_rows_ptr, bias_ptr, n_total, EXTRAS,
                            HAS_BIAS)
            if REST_PAD > 0:  # the features past rotary_dim get the delta too (q's stay in place for attention)
                r = 2 * HALF + tl.arange(0, REST_PAD)
                mr = (heads < n_heads)[:, None] & (r < HEAD_DIM)[None, :]
                pr = base + heads[:, None] * stride_h + r[None, :]
                rest = tl.load(pr, mask=mr, other=0.0)
                rest = fold_delta(rest, d_row, col0 + heads[:, None] * HEAD_DIM + r[None, :], mr, lslot, rank,
                                  ext_ptr, ext_rows_ptr, bias_ptr, n_total, EXTRAS, HAS_BIAS)
                tl.store(pr, rest, mask=mr)
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        o1 = (x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32)
        o2 = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
        tl.store(p1, o1.to(dt), mask=m)
        tl.store(p1 + HALF, o2.to(dt), mask=m)
        if CACHE:
            if which == 1:  # the rotated keys, the features past rotary_dim as they are, and the values
                c1 = k_row + heads[:, None] * stride_ch + d[None, :]
                tl.store(c1, o1.to(dt).to(cdt), mask=m & keep)
                tl.store(c1 + HALF, o2.to(dt).to(cdt), mask=m & keep)
                if REST_PAD > 0:
                    r = 2 * HALF + tl.arange(0, REST_PAD)
                    mr = (heads < HK)[:, None] & (r < HEAD_DIM)[None, :]
                    rest = tl.load(base + heads[:, None] * stride_h + r[None, :], mask=mr, other=0.0)
                    tl.store(k_row + heads[:, None] * stride_ch + r[None, :], rest.to(cdt), mask=mr & keep)
                dv = tl.arange(0, D_PAD)
                mv = (heads < HK)[:, None] & (dv < HEAD_DIM)[None, :]
                vv = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + dv[None, :], mask=mv, other=0.0)
                if HAS_DELTA:  # into the cache only: attention reads v there
                    rank_v = tl.load(ranks_ptr + 2 * num_slots + tl.maximum(lslot, 0))
                    vv = fold_delta(vv, d_row, col_v + heads[:, None] * HEAD_DIM + dv[None, :], mv, lslot, rank_v,
                                    ext_ptr, ext_rows_ptr, bias_ptr, n_total, EXTRAS, HAS_BIAS)
                tl.store(v_row + heads[:, None] * stride_ch + dv[None, :], vv.to(cdt), mask=mv & keep)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, N, stride_x, stride_o, d_ptr, stride_d, slots_ptr, ranks_ptr, ext_ptr,
                         ext_rows_ptr, bias_ptr, num_slots, BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr,
                         EXTRAS: tl.constexpr, HAS_BIAS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0)
    if HAS_DELTA:  # the gate_up layer's LoRA delta (slices gate, up), added first (as lora_add_delta would)
        slot = tl.load(slots_ptr + row).to(tl.int32)
        rank_g = tl.load(ranks_ptr + tl.maximum(slot, 0))
        rank_u = tl.load(ranks_ptr + num_slots + tl.maximum(slot, 0))
        d_row = d_ptr + row * stride_d
        g = fold_delta(g, d_row, cols, mask, slot, rank_g, ext_ptr, ext_rows_ptr, bias_ptr, 2 * N, EXTRAS, HAS_BIAS)
        u = fold_delta(u, d_row, N + cols, mask, slot, rank_u, ext_ptr, ext_rows_ptr, bias_ptr, 2 * N, EXTRAS,
                       HAS_BIAS)
    u = u.to(tl.float32)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * u).to(g.dtype), mask=mask)


_launch_rms = Launcher(_rms_norm_kernel)
_launch_rotary = Launcher(_rotary_kernel)
_launch_silu = Launcher(_silu_and_mul_kernel)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None,
             delta: Optional[PendingDelta] = None) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (..., N); with ``residual`` (same shape), of ``x + residual``,
    which is also written into ``residual``. Returns a new tensor in ``x``'s dtype. ``delta``: the pending LoRA
    delta of the one-slice layer that wrote ``x``, folded into ``x`` first (``x`` itself is not written)."""
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
    fold, flags = _fold(delta, x2, 1)
    _launch_rms((rows,), (x2, r2, out, weight, N, x2.stride(0), r2.stride(0), out.stride(0), float(eps), *fold),
                dict(HAS_RES=residual is not None, BLOCK=block, **flags), num_warps=min(16, max(1, block // 256)))
    return out.view(x.shape)


def _fold(delta: Optional[PendingDelta], y2: torch.Tensor, slices: int) -> tuple[tuple, dict]:
    """The fold arguments and constexprs of a kernel reading ``y2`` (rows, sum(n_i)), written by a layer of
    ``slices`` equal slices whose LoRA delta ``delta`` is pending (None: placeholders, folding off)."""
    if delta is None:
        return (y2, 0, y2, y2, y2, y2, y2), dict(HAS_DELTA=False, EXTRAS=False, HAS_BIAS=False)
    assert delta.delta.shape == y2.shape and delta.delta.stride(1) == 1 and delta.ranks_t.shape[0] == slices \
        and delta.ranks_t.is_contiguous(), f"pending delta {tuple(delta.delta.shape)} for {tuple(y2.shape)}"
    return delta.fold_args(), dict(HAS_DELTA=True, **delta.fold_flags())


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           rotary_dim: int, v: Optional[torch.Tensor] = None, k_cache: Optional[torch.Tensor] = None,
           v_cache: Optional[torch.Tensor] = None, slot_mapping: Optional[torch.Tensor] = None,
           delta: Optional[PendingDelta] = None, qkv: Optional[torch.Tensor] = None) -> None:
    """Rotate the first ``rotary_dim`` features of every head of ``q`` (T, HQ, D) and ``k`` (T, HK, D) in
    place by the angles of ``positions`` (T,), from the tables ``cos`` / ``sin`` (max_position, rotary_dim).
    With the caches (slots, HK, D), also ``k_cache[slot_mapping] = k`` (rotated) and ``v_cache[slot_mapping] =
    v`` in the caches' dtype, in the same launch (rows whose slot is negative are not written). ``delta``: the
    pending LoRA delta of the qkv layer whose output ``qkv`` (T, q + 2 kv) q, k and v are views of (slices q, k,
    v), folded into q, k and v first (with the caches only; v itself is not written, only its cache rows)."""
    T = q.shape[0]
    if T == 0:
        return
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1 and sin.stride() == cos.stride()
    half = rotary_dim // 2
    D = q.shape[2]
    cache = k_cache is not None
    if cache:
        assert v is not None and v_cache is not None and slot_mapping is not None and v.stride(2) == 1
        assert k_cache.shape[1:] == (k.shape[1], D) and v_cache.stride() == k_cache.stride() \
            and k_cache.stride(2) == 1, f"caches (slots, {k.shape[1]}, {D}) alike, got {tuple(k_cache.shape)}"
    else:
        assert delta is None, "a pending LoRA delta is folded only with the cache write"
        v = k_cache = v_cache = k
        slot_mapping = positions
    cols = (0, 0)
    if delta is not None:  # q, k, v: head-contiguous views of the rows of qkv, at these columns
        el = qkv.element_size()
        cols = tuple((t.data_ptr() - qkv.data_ptr()) // el for t in (k, v))
        assert q.data_ptr() == qkv.data_ptr() and all((t.stride(0) == qkv.stride(0) or T == 1) and t.stride(1) == D
                                                      for t in (q, k, v)), "q, k, v must be views of qkv's rows"
    fold, flags = _fold(delta, qkv if delta is not None else q, 3)
    _launch_rotary((T,), (q, k, positions, cos, sin, v, k_cache, v_cache, slot_mapping,
                          q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                          k_cache.stride(0), k_cache.stride(1), cos.stride(0), q.shape[1], k.shape[1], *fold,
                          delta.ranks_t.shape[1] if delta is not None else 0, *cols,
                          qkv.shape[1] if delta is not None else 0),
                   dict(HALF=half, HALF_PAD=triton.next_power_of_2(half),
                        H_PAD=triton.next_power_of_2(max(q.shape[1], k.shape[1])), CACHE=cache, HEAD_DIM=D,
                        REST_PAD=triton.next_power_of_2(D - 2 * half) if cache and D > 2 * half else 0,
                        D_PAD=triton.next_power_of_2(D), **flags), num_warps=4)


def silu_and_mul(x: torch.Tensor, delta: Optional[PendingDelta] = None) -> torch.Tensor:
    """(T, 2N) ``[gate | up]`` -> (T, N) ``silu(gate) * up``. ``delta``: the pending LoRA delta of the gate_up
    layer that wrote ``x`` (two slices, gate then up), folded in first (``x`` itself is not written)."""
    N = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], N, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out.view(*x.shape[:-1], N)
    block = min(1024, triton.next_power_of_2(N))
    fold, flags = _fold(delta, x2, 2)
    slots = delta.ranks_t.shape[1] if delta is not None else 0
    _launch_silu((x2.shape[0], triton.cdiv(N, block)), (x2, out, N, x2.stride(0), out.stride(0), *fold, slots),
                 dict(BLOCK=block, **flags), num_warps=4)
    return out.view(*x.shape[:-1], N)
