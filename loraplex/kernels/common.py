"""Helpers shared by the Triton kernels (imported only by them: ``import loraplex`` stays light)."""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

# Read when the kernels are imported, as triton reads it when it decorates them.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs: exact fp32 products ("ieee", no TF32) so results match the torch reference;
    bf16/fp16 products are exact on tensor cores anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: Optional[torch.device] = None) -> int:
    """Streaming multiprocessors of the current CUDA device (1 under the interpreter: fewest programs)."""
    if INTERPRET or (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return 1
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    return _sms(index)
