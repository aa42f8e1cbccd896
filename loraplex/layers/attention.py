"""Paged attention over a flat batch (PyTorch reference path, CPU and CUDA).

New keys/values are written into the paged cache at ``slot_mapping``; each
sequence then attends over its whole cached context, gathered through its block
table into a padded ``(B, L, kv_heads, dim)`` view. Query ``j`` of sequence ``b``
sees keys at positions ``<= query_pos[b, j]`` (causal), and with a sliding window
only the last ``sliding_window`` of them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.engine.context import AttentionMetadata, get_forward_context


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: Optional[int] = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        # (num_blocks, block_size, kv_heads, dim), bound by the model runner.
        self.k_cache: Optional[torch.Tensor] = None
        self.v_cache: Optional[torch.Tensor] = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (T, heads, dim); k, v: (T, kv_heads, dim) -> (T, heads * dim)
        meta = get_forward_context().attn
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("KV cache not allocated; the model runner binds it before the first forward")
        kc = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        vc = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        kc.index_copy_(0, meta.slot_mapping, k.to(kc.dtype))
        vc.index_copy_(0, meta.slot_mapping, v.to(vc.dtype))
        return self._attend(q, k, v, meta)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        T = q.shape[0]
        flat = torch.empty(T, self.num_heads, self.head_dim, dtype=q.dtype, device=q.device)
        for part in meta.groups or (meta,):  # decodes and prefill chunks apart: no padding of one to the other
            self._attend_into(flat, q, k, v, part)
        return flat.reshape(T, self.num_heads * self.head_dim)

    def _attend_into(self, flat: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     meta: AttentionMetadata) -> None:
        """Attention of the sequences of ``meta``, written into their rows of ``flat`` (T, heads, dim)."""
        B, max_q = meta.query_index.shape
        qi = meta.query_index.clamp(min=0)
        if meta.prefill_only:
            # No earlier context: each sequence attends over its own new tokens only,
            # so keys come straight from this step's k/v, no cache gather.
            keys, vals = k[qi], v[qi]  # (B, max_q, kv_heads, dim)
            L = max_q
        else:
            bs = self.k_cache.shape[1]
            nblk = (meta.max_context_len + bs - 1) // bs
            tables = meta.block_tables[:, :nblk]
            L = nblk * bs
            keys = self.k_cache[tables].reshape(B, L, self.num_kv_heads, self.head_dim)
            vals = self.v_cache[tables].reshape(B, L, self.num_kv_heads, self.head_dim)
        mask = meta.attention_mask(L, self.sliding_window)  # (B, 1, max_q, L), shared by all layers
        out = F.scaled_dot_product_attention(
            q[qi].transpose(1, 2),  # (B, heads, max_q, dim)
            keys.transpose(1, 2), vals.transpose(1, 2),  # (B, kv_heads, L, dim)
            attn_mask=mask, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads,
        ).transpose(1, 2)  # (B, max_q, heads, dim)
        if max_q == 1:  # decodes: every row is a real token, no padding to drop
            flat[meta.query_index[:, 0]] = out[:, 0]
        else:
            valid = meta.query_index >= 0
            flat[meta.query_index[valid]] = out[valid]
