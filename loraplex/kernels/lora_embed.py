"""Embedding LoRA, the A side: a row gather by token id, per token slot.

    buf[t, :r] = A_t[slot(t), ids[t], :r]        (zero for base rows, slot -1, and past the slot's rank)

The B side is :func:`loraplex.kernels.lora_expand.lora_expand` with one slice.
Reference: :func:`loraplex.lora.backends.torch_backend.embed_reference`.
Schedule: one program per ``BLOCK_T`` tokens; loads past a slot's rank are masked.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from loraplex.kernels.common import Launcher, identity_pages


# per-step sizes: never specialised (a new value must not compile a kernel variant mid-serving)
@triton.jit(do_not_specialize=["T"])
def _embed_gather_kernel(
    ids_ptr, slots_ptr, a_ptr, ranks_ptr, pages_ptr, out_ptr,
    T, V,
    MAX_RANK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, PAGE: tl.constexpr,
    MAX_PAGES: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    slot = tl.load(slots_ptr + offs_t, mask=t_mask, other=-1)
    tok = tl.load(ids_ptr + offs_t, mask=t_mask, other=0)
    rank = tl.load(ranks_ptr + tl.maximum(slot, 0), mask=t_mask, other=0)
    rank = tl.where(slot >= 0, rank, 0)
    offs_r = tl.arange(0, BLOCK_R)
    rank = tl.where((tok >= 0) & (tok < V), rank, 0)  # memory safety: an id outside the table reads nothing
    mask = offs_r[None, :] < rank[:, None]
    # a_t (pages, V, PAGE): rank r of slot s in page pages[s, r // PAGE]
    page = tl.load(pages_ptr + tl.maximum(slot, 0)[:, None] * MAX_PAGES + offs_r[None, :] // PAGE, mask=mask,
                   other=0).to(tl.int64)
    vals = tl.load(a_ptr + (page * V + tok[:, None]) * PAGE + offs_r[None, :] % PAGE, mask=mask, other=0.0)
    tl.store(out_ptr + offs_t[:, None] * MAX_RANK + offs_r[None, :], vals.to(tl.float32),
             mask=t_mask[:, None] & (offs_r[None, :] < MAX_RANK))


_launch_gather = Launcher(_embed_gather_kernel)


def lora_embed_gather(ids: torch.Tensor, token_slots: torch.Tensor, a_t: torch.Tensor,
                      ranks_t: torch.Tensor, pages: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``buf[t, :r] = A_t[slot(t), ids[t], :r]`` as float32 ``(1, T, 1, max_rank)`` (the expand kernel's input).

    ids (T,) int; token_slots (T,) int64 (-1: base); a_t (pages, vocab, page_rank); ranks_t (slots,) int32;
    ``pages`` (slots, max_pages) int32 (default: the padded layout, a_t (slots, vocab, max_rank))."""
    if pages is None:
        pages = identity_pages(a_t.shape[0], a_t.device)
    assert a_t.is_contiguous() and ranks_t.is_contiguous() and token_slots.is_contiguous() and pages.is_contiguous()
    ids = ids if ids.is_contiguous() else ids.contiguous()
    T = ids.shape[0]
    max_rank = a_t.shape[2] * pages.shape[1]
    out = torch.empty(1, T, 1, max_rank, dtype=torch.float32, device=ids.device)
    if T == 0:
        return out
    block_t = 32
    _launch_gather(
        (triton.cdiv(T, block_t),),
        (ids, token_slots, a_t, ranks_t, pages, out,
         T, a_t.shape[1]),
        dict(MAX_RANK=max_rank, BLOCK_T=block_t, BLOCK_R=max(16, triton.next_power_of_2(max_rank)),
             PAGE=a_t.shape[2], MAX_PAGES=pages.shape[1]),
        num_warps=4,
    )
    return out
