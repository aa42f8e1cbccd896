"""Paged attention over a flat batch: cache write, then the attention backend.

New keys/values are written into the paged cache at ``slot_mapping``; the backend then attends each new
token over its sequence's cached context in place (the flat varlen layout of
:mod:`loraplex.attention.metadata`). Query at position p sees keys at positions <= p, and with a sliding
window only those > p - window.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from loraplex.attention.registry import AttentionBackend, get_attention_backend
from loraplex.engine.context import get_forward_context, take_delta_within
from loraplex.layers.rotary import RotaryEmbedding


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: Optional[int] = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        # (num_blocks, block_size, kv_heads, dim), bound by the model runner with the backend.
        self.k_cache: Optional[torch.Tensor] = None
        self.v_cache: Optional[torch.Tensor] = None
        self.backend: Optional[AttentionBackend] = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: Optional[torch.Tensor] = None,
                rope: Optional[RotaryEmbedding] = None) -> torch.Tensor:
        """q: (T, heads, dim); k, v: (T, kv_heads, dim) -> (T, heads * dim). With ``rope`` (and ``positions``),
        q and k are rotated first, on CUDA by the kernel that also writes the cache."""
        meta = get_forward_context().attn
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("KV cache not allocated; the model runner binds it before the first forward")
        if self.backend is None:
            self.backend = get_attention_backend("torch")
        kc = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)  # (slots, kv_heads, dim)
        vc = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        # the qkv layer's LoRA delta, when it left it to the rotary kernel (q, k, v: views of its output)
        pending = take_delta_within(q)
        delta, qkv = (pending[1], pending[0]) if pending is not None else (None, None)
        if rope is None or not rope.rotate_into_cache(positions, q, k, v, kc, vc, meta.slot_mapping, delta, qkv):
            if delta is not None:  # the kernel cannot take it here: add it to the layer's output first
                delta.apply(qkv)
            if rope is not None:
                q, k = rope(positions, q, k)
            kc.index_copy_(0, meta.slot_mapping, k.to(kc.dtype))
            vc.index_copy_(0, meta.slot_mapping, v.to(vc.dtype))
        out = self.backend.forward(q, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
