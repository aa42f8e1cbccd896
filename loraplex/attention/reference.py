"""PyTorch reference of paged attention over the flat varlen layout (the CPU backend).

Gathers each sequence's keys through its block table and runs SDPA: the leading decodes in one batched
call (keys padded to the longest decode, a key-padding mask), every other sequence in its own call.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from loraplex.attention.metadata import AttentionMetadata


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                        scale: float, sliding_window: Optional[int] = None) -> torch.Tensor:
    """``out[t, h] = softmax(scale * q[t, h] @ K[b, :, h // (H / KVH)].T, keys at positions p' <= p(t) and
    p' > p(t) - window) @ V[b, ...]`` for token t of sequence b at position p(t); q (T, H, D), caches
    (num_blocks, block_size, KVH, D) -> out (T, H, D)."""
    T, H, D = q.shape
    bs, KVH = k_cache.shape[1], k_cache.shape[2]
    gqa = H != KVH
    qsl, lens = meta.host_lists()
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        # One new token each: batch them, keys padded to the longest decode and masked past each length.
        L = max(lens[:nd])
        nblk = -(-L // bs)
        tables = meta.block_tables[:nd, :nblk].long()
        keys = k_cache[tables].reshape(nd, nblk * bs, KVH, D)[:, :L]  # (nd, L, KVH, D)
        vals = v_cache[tables].reshape(nd, nblk * bs, KVH, D)[:, :L]
        kpos = torch.arange(L, device=q.device).view(1, L)
        seq = meta.seq_lens[:nd].long().view(nd, 1)
        mask = kpos < seq  # (nd, L): the query sits at position seq - 1
        if sliding_window is not None:
            mask &= kpos >= seq - sliding_window
        rows = slice(qsl[0], qsl[nd])  # decodes first: their rows are contiguous
        o = F.scaled_dot_product_attention(
            q[rows].unsqueeze(2).to(keys.dtype),  # (nd, H, 1, D)
            keys.transpose(1, 2), vals.transpose(1, 2),  # (nd, KVH, L, D)
            attn_mask=mask.view(nd, 1, 1, L), scale=scale, enable_gqa=gqa)
        out[rows] = o.squeeze(2).to(out.dtype)
    for b in range(nd, len(lens)):
        s, e, L = qsl[b], qsl[b + 1], lens[b]
        n = e - s
        if n == 0:
            continue
        nblk = -(-L // bs)
        blocks = meta.block_tables[b, :nblk].long()
        keys = k_cache[blocks].reshape(nblk * bs, KVH, D)[:L]  # (L, KVH, D)
        vals = v_cache[blocks].reshape(nblk * bs, KVH, D)[:L]
        mask = None
        causal = n == L and n > 1 and sliding_window is None  # a whole prompt: the plain causal mask
        if not causal and (n > 1 or sliding_window is not None):
            qpos = torch.arange(L - n, L, device=q.device).view(n, 1)
            kpos = torch.arange(L, device=q.device).view(1, L)
            mask = kpos <= qpos  # (n, L)
            if sliding_window is not None:
                mask &= kpos > qpos - sliding_window
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1).to(keys.dtype),  # (H, n, D)
            keys.transpose(0, 1), vals.transpose(0, 1),  # (KVH, L, D)
            attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
        out[s:e] = o.transpose(0, 1).to(out.dtype)
    return out


class TorchAttentionBackend:
    """The reference as a backend: runs anywhere torch does."""

    name = "torch"

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, sliding_window: Optional[int] = None) -> torch.Tensor:
        return paged_attention_ref(q, k_cache, v_cache, meta, scale, sliding_window)
