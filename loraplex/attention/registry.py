"""Attention-backend registry: ``torch`` (the reference, any device), ``triton`` (paged kernels, CUDA; on CPU
only under ``TRITON_INTERPRET=1``, for tests) and ``auto``. Backends import lazily, so importing loraplex
pulls no triton."""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from loraplex.attention.metadata import AttentionMetadata
from loraplex.backend_registry import load_backend, resolve_auto


class AttentionBackend(Protocol):
    name: str

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, sliding_window: Optional[int] = None) -> torch.Tensor:
        """q (T, H, D), caches (num_blocks, block_size, KVH, D) already holding this step's keys -> (T, H, D)."""


_BACKENDS = {
    "torch": ("loraplex.attention.reference", "TorchAttentionBackend"),
    "triton": ("loraplex.attention.triton_attention", "TritonAttentionBackend"),
}
NAMES = (*_BACKENDS, "auto")


def resolve_attention_backend(name: str, device: Optional[torch.device] = None) -> str:
    """``auto`` -> ``triton`` on CUDA when triton imports, else ``torch``; other names unchanged."""
    return resolve_auto(name, device)


def get_attention_backend(name: str, device: Optional[torch.device] = None) -> AttentionBackend:
    """The attention backend registered as ``name`` (``auto``: see :func:`resolve_attention_backend`)."""
    return load_backend("attention backend", "attention_backend", name, _BACKENDS, device)
