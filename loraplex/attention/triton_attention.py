"""Triton paged attention: K/V read in place from the paged cache through the block table.

    out[t, h] = softmax(scale * q[t, h] @ K[b, p' <= p(t), h // G].T) @ V[b, ...]   (window: p' > p(t) - W)

Reference: :func:`loraplex.attention.reference.paged_attention_ref`. Two kernels plus a reduction:

* ``_unified_kernel`` (prefill chunks, decodes, mixed steps): one program per (block of ``BLOCK_Q`` query
  tokens of one sequence, kv head). Its ``BLOCK_M = BLOCK_Q x G`` rows are those tokens times the G query
  heads sharing the kv head, so each K/V tile is read once for the whole group. Programs are numbered
  ``(query_start_loc[b] // BLOCK_Q + b) + j``, an upper bound of ``T // BLOCK_Q + B`` in all; a program finds
  its sequence by binary search over ``query_start_loc`` and exits if it lies past that sequence's tokens.
  It loops over key tiles of ``TILE_N`` positions up to its last query's position (causal) and from its
  first query's window start, looking up each position's physical block, with an online softmax in float32.
* ``_decode_split_kernel`` + ``_reduce_kernel`` (decodes too few to fill the GPU: :func:`decode_splits`): one
  program per (decode, kv head, split); split s covers an equal share of the keys and writes its unnormalised
  output, max and sum; the reduction rescales and sums the splits.

Grids come from host ints (``T``, ``max_query_len``, ``num_decodes``): nothing syncs. Head dims that are not
a power of two are padded (masked loads); accumulation is in float32 for every input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from loraplex.attention.metadata import AttentionMetadata
from loraplex.kernels.common import INTERPRET, Launcher, dot_precision, num_sms

_LOG2E = 1.4426950408889634


# seq_begin / num_seqs start loop-carried values of the binary search: never specialised into constants
@triton.jit(do_not_specialize=["seq_begin", "num_seqs"])
def _unified_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, qsl_ptr, seq_lens_ptr, tables_ptr,
    qk_scale, seq_begin, num_seqs, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_tb,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    # The sequence of this program: the last b in [seq_begin, num_seqs) whose first program is <= pid.
    base = tl.load(qsl_ptr + seq_begin)
    lo = seq_begin + 1
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = (tl.load(qsl_ptr + mid) - base) // BLOCK_Q + (mid - seq_begin)
        go_right = first <= pid
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(go_right, hi, mid)
    b = lo - 1
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    q0 = (pid - ((q_start - base) // BLOCK_Q + (b - seq_begin))) * BLOCK_Q
    if q0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len  # tokens cached before this step: the first new token sits at position ctx

    rows = tl.arange(0, BLOCK_M)
    tok = q0 + rows // G_PAD  # (BLOCK_M,) query token of each row (within the sequence's new tokens)
    head = kvh * GROUP + rows % G_PAD
    row_ok = (rows // G_PAD < BLOCK_Q) & (tok < q_len) & (rows % G_PAD < GROUP)
    dims = tl.arange(0, D_PAD)
    d_ok = dims < HEAD_DIM
    q_off = (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh
    qv = tl.load(q_ptr + q_off[:, None] + dims[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter's tl.dot takes no bf16/fp16
        qv = qv.to(tl.float32)
    q_pos = ctx + tok

    last = tl.minimum(q0 + BLOCK_Q, q_len)  # exclusive: keys up to the block's last query position
    kv_hi = ctx + last
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(ctx + q0 - window + 1, 0) // TILE_N * TILE_N

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    table = tables_ptr + b.to(tl.int64) * stride_tb
    for start in range(kv_lo, kv_hi, TILE_N):
        kpos = start + tl.arange(0, TILE_N)
        k_ok = kpos < kv_hi
        blk = tl.load(table + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        off = kpos % BLOCK_SIZE
        k_off = blk * stride_kb + off * stride_ks + kvh * stride_kh
        kt = tl.load(k_ptr + k_off[None, :] + dims[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        v_off = blk * stride_vb + off * stride_vs + kvh * stride_vh
        # V's tile requested beside K's, before the QK product needs K: two loads in flight
        vt = tl.load(v_ptr + v_off[:, None] + dims[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(qv, kt, input_precision=PRECISION) * qk_scale  # (BLOCK_M, TILE_N), log2 domain
        ok = (kpos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        if USE_WINDOW:
            ok = ok & (kpos[None, :] > q_pos[:, None] - window)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: no NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST:
            vt = vt.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        m_i = m_new

    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_off = (q_start + tok).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_ptr + o_off[:, None] + dims[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, part_ptr, stats_ptr, qsl_ptr, seq_lens_ptr, tables_ptr,
    qk_scale, window, num_heads,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_tb,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    NUM_SPLITS: tl.constexpr, TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # part (decodes, H, NUM_SPLITS, D_PAD) float32: unnormalised output; stats (decodes, H, NUM_SPLITS, 2): max, sum
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    q_row = tl.load(qsl_ptr + b).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP
    head = kvh * GROUP + rows
    dims = tl.arange(0, D_PAD)
    d_ok = dims < HEAD_DIM
    qv = tl.load(q_ptr + q_row * stride_qt + head[:, None] * stride_qh + dims[None, :],
                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        qv = qv.to(tl.float32)

    kv_lo = 0
    if USE_WINDOW:  # the query sits at seq_len - 1 and sees seq_len - window onwards
        kv_lo = tl.maximum(seq_len - window, 0)
    chunk = tl.cdiv(tl.cdiv(seq_len - kv_lo, NUM_SPLITS), TILE_N) * TILE_N
    lo = kv_lo + split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    table = tables_ptr + b.to(tl.int64) * stride_tb
    for start in range(lo, hi, TILE_N):
        kpos = start + tl.arange(0, TILE_N)
        k_ok = kpos < hi
        blk = tl.load(table + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        off = kpos % BLOCK_SIZE
        k_off = blk * stride_kb + off * stride_ks + kvh * stride_kh
        kt = tl.load(k_ptr + k_off[None, :] + dims[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        v_off = blk * stride_vb + off * stride_vs + kvh * stride_vh
        # V's tile requested beside K's, before the QK product needs K: two loads in flight
        vt = tl.load(v_ptr + v_off[:, None] + dims[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(qv, kt, input_precision=PRECISION) * qk_scale  # (BLOCK_M, TILE_N)
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST:
            vt = vt.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        m_i = m_new

    cell = (b.to(tl.int64) * num_heads + head) * NUM_SPLITS + split  # (BLOCK_M,)
    tl.store(part_ptr + cell[:, None] * D_PAD + dims[None, :], acc, mask=row_ok[:, None])
    tl.store(stats_ptr + cell * 2, m_i, mask=row_ok)
    tl.store(stats_ptr + cell * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _reduce_kernel(
    part_ptr, stats_ptr, out_ptr, qsl_ptr, num_heads, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, D_PAD)
    cell = (b.to(tl.int64) * num_heads + h) * NUM_SPLITS + splits
    m = tl.load(stats_ptr + cell * 2)
    l_s = tl.load(stats_ptr + cell * 2 + 1)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # empty splits (max -inf) weigh 0
    total = tl.sum(w * l_s, 0)
    part = tl.load(part_ptr + cell[:, None] * D_PAD + dims[None, :])
    o = tl.sum(part * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    q_row = tl.load(qsl_ptr + b).to(tl.int64)
    tl.store(out_ptr + q_row * stride_ot + h * stride_oh + dims, o.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


_launch_unified = Launcher(_unified_kernel)
_launch_decode_split = Launcher(_decode_split_kernel)
_launch_reduce = Launcher(_reduce_kernel)


# Key tile, warps and pipeline stages of every step (decodes, prompt chunks, both): within 4% of the best tiling
# of each step shape timed in CUDA graphs on an H200 (docs/results/attention_graph_sweep_h200_2026-11-30h.json),
# where key tiles of 32 in three stages took 1.3x as long for 32 decodes at context 192.
TILE_N, NUM_WARPS, NUM_STAGES = 64, 4, 2
# Each key tile's V load is issued beside its K load, before the QK product: on an H200 (2026-12-01, HBM-read
# operands) the same time for every decode shape and 0.92x for a mixed step of 480 tokens at 8k context, where
# loading V after the product had it wait for the product.


def decode_splits(num_decodes: int, num_kv_heads: int, max_seq_len: int,
                  device: Optional[torch.device] = None) -> int:
    """Splits of the context for the decode kernel (1: the unified kernel takes the decodes): about four
    programs per SM over the decodes' (sequence, kv head) pairs, at most 16 splits, each at least a key tile.
    Timed in CUDA graphs on an H200 (8 kv heads, the 8B shape): 32 decodes at 192 keys 10.5 us with 2 splits
    against 13.8 us with none; 8 at 4,096 keys 40 us with 8 (50 with 4); one at 8,000, 18 us with 16; 128 decodes
    are fastest unsplit. A graph captures it at the model's longest context, so it depends on the batch there."""
    if num_decodes == 0:
        return 1
    want = min(4 * num_sms(device) // (num_decodes * num_kv_heads), max_seq_len // TILE_N, 16)
    return max(1, triton.next_power_of_2(want + 1) // 2)  # largest power of two <= want


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, sliding_window: Optional[int] = None, num_splits: Optional[int] = None,
                    tile_n: int = TILE_N, out: Optional[torch.Tensor] = None, rows: int = 64,
                    num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES) -> torch.Tensor:
    """Triton paged attention (semantics in the module docstring); q (T, H, D), caches (num_blocks,
    block_size, KVH, D) -> (T, H, D). ``num_splits`` (a power of two) overrides the split-K decode heuristic
    (1: no split); ``rows`` (query rows per program of the unified kernel when steps hold prompt chunks),
    ``tile_n``, ``num_warps`` and ``num_stages`` the tiling of both kernels (tuning; one tiling for every step,
    so the decodes of an eager step with prompt chunks reuse the kernel variants the decode graphs compiled)."""
    T, H, D = q.shape
    _, block_size, KVH, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape, f"cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)}"
    assert H % KVH == 0, f"{H} query heads are not a multiple of {KVH} kv heads"
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "head dim must be contiguous"
    assert tile_n >= 16 and tile_n & (tile_n - 1) == 0, f"tile_n must be a power of two >= 16, got {tile_n}"
    if out is None:
        out = torch.empty_like(q)
    if T == 0:
        return out
    group = H // KVH
    g_pad = triton.next_power_of_2(group)
    d_pad = max(16, triton.next_power_of_2(D))
    window = sliding_window if sliding_window is not None else 0
    qk_scale = scale * _LOG2E
    precision = dot_precision(q.dtype)
    tables = meta.block_tables
    B = meta.num_seqs
    nd = meta.num_decodes
    if num_splits is None:
        num_splits = decode_splits(nd, KVH, meta.max_seq_len, q.device)
    assert num_splits >= 1 and num_splits & (num_splits - 1) == 0, f"num_splits must be a power of two, got {num_splits}"
    seq_begin = 0
    if nd and num_splits > 1:
        block_m = max(16, g_pad)
        part = torch.empty(nd, H, num_splits, d_pad, dtype=torch.float32, device=q.device)
        stats = torch.empty(nd, H, num_splits, 2, dtype=torch.float32, device=q.device)
        _launch_decode_split(
            (nd, KVH, num_splits),
            (q, k_cache, v_cache, part, stats, meta.query_start_loc, meta.seq_lens, tables,
             qk_scale, window, H,
             q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
             v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), tables.stride(0)),
            dict(HEAD_DIM=D, D_PAD=d_pad, GROUP=group, BLOCK_M=block_m, NUM_SPLITS=num_splits, TILE_N=tile_n,
                 BLOCK_SIZE=block_size, USE_WINDOW=sliding_window is not None, PRECISION=precision,
                 UPCAST=INTERPRET),
            num_warps=num_warps, num_stages=num_stages)
        _launch_reduce((nd, H), (part, stats, out, meta.query_start_loc, H, out.stride(0), out.stride(1)),
                       dict(HEAD_DIM=D, D_PAD=d_pad, NUM_SPLITS=num_splits), num_warps=4)
        seq_begin = nd
        if nd == B:
            return out
    # Rows per program: BLOCK_Q tokens x the padded head group, at least 16 (tl.dot's smallest M).
    # Two sizes only (each compiles once): one token per program for decode-only steps, else the most that fit.
    block_q = 1 if meta.max_query_len == 1 else max(1, rows // g_pad)
    block_m = max(16, block_q * g_pad)
    tokens = T - seq_begin  # an upper bound of the rows of sequences seq_begin.. (decodes first: one each)
    grid = (tokens // block_q + (B - seq_begin), KVH)
    _launch_unified(
        grid,
        (q, k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens, tables,
         qk_scale, seq_begin, B, window,
         q.stride(0), q.stride(1), out.stride(0), out.stride(1),
         k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
         v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), tables.stride(0)),
        dict(HEAD_DIM=D, D_PAD=d_pad, GROUP=group, G_PAD=g_pad, BLOCK_Q=block_q, BLOCK_M=block_m, TILE_N=tile_n,
             BLOCK_SIZE=block_size, USE_WINDOW=sliding_window is not None, PRECISION=precision, UPCAST=INTERPRET),
        num_warps=num_warps, num_stages=num_stages)
    return out


class TritonAttentionBackend:
    """Paged attention kernels (CUDA; CPU under ``TRITON_INTERPRET=1``)."""

    name = "triton"

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, sliding_window: Optional[int] = None) -> torch.Tensor:
        return paged_attention(q, k_cache, v_cache, meta, scale, sliding_window)
