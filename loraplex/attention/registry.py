"""Attention-backend registry: ``torch`` (the reference, any device), ``triton`` (paged kernels, CUDA; on CPU
only under ``TRITON_INTERPRET=1``, for tests) and ``auto``. Backends import lazily, so importing loraplex
pulls no triton."""

from __future__ import annotations

import importlib
from typing import Optional, Protocol

import torch

from loraplex.attention.metadata import AttentionMetadata
from loraplex.lora.backends.base import triton_usable


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
    if name != "auto":
        return name
    cuda = device is not None and torch.device(device).type == "cuda"
    return "triton" if cuda and triton_usable(device) else "torch"


def get_attention_backend(name: str, device: Optional[torch.device] = None) -> AttentionBackend:
    """The attention backend registered as ``name`` (``auto``: see :func:`resolve_attention_backend`)."""
    if name not in NAMES:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(NAMES)}")
    name = resolve_attention_backend(name, device)
    if name == "triton" and device is not None and not triton_usable(device):
        raise ValueError(f"attention_backend='triton' cannot run on device {str(device)!r}: it needs a CUDA device "
                         "and the triton package (on CPU only for tests, with TRITON_INTERPRET=1 set before triton "
                         "is imported); use attention_backend='torch' or 'auto'")
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)()
