"""Gated activations for MLPs: ``act(gate) * up`` on a fused ``[gate | up]`` input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ACTS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class GatedActivation(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in _ACTS:
            raise ValueError(f"unsupported hidden_act {name!r}; supported: {sorted(_ACTS)}")
        self.act = _ACTS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (tokens, 2 * inter) -> (tokens, inter)
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up
