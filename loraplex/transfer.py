"""Host-to-device copies of a step's small host tensors."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device``: on CUDA through pinned memory and a non-blocking copy, so the host
    never waits for the GPU's queued work (a copy from pageable memory would)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
