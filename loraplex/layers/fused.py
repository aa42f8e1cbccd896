"""Which tensors take the fused Triton layer kernels (:mod:`loraplex.kernels.layer_ops`).

CUDA tensors do, when Triton imports; CPU tensors run the PyTorch reference in the layers themselves.
``LORAPLEX_FUSED_KERNELS=0`` turns the kernels off (to compare against the eager reference on a GPU).
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from loraplex import envs

_ops: Optional[ModuleType] = None
_tried = False


def fused_ops(x: torch.Tensor) -> Optional[ModuleType]:
    """The kernel module for ``x``, or None (CPU, no Triton, or turned off)."""
    global _ops, _tried
    if not x.is_cuda:
        return None
    if not _tried:
        _tried = True
        if envs.LORAPLEX_FUSED_KERNELS:
            try:
                from loraplex.kernels import layer_ops

                _ops = layer_ops
            except ImportError:
                _ops = None
    return _ops
