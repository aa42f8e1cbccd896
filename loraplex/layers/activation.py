"""Activations: gated ``act(gate) * up`` on a fused ``[gate | up]`` input (decoder MLPs) and
plain element-wise ones by Hugging Face ``hidden_act`` name (vision towers, projectors)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.engine.context import take_delta
from loraplex.layers.fused import fused_ops

_ACTS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def get_act_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The element-wise activation a Hugging Face config names (``hidden_act``)."""
    if name not in _ACTS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTS)}")
    return _ACTS[name]


class Activation(nn.Module):
    """``get_act_fn(name)`` as a module (for ``nn.Sequential`` stacks that mirror Hugging Face's)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.act = get_act_fn(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


class GatedActivation(nn.Module):
    """``act(gate) * up`` of a fused ``[gate | up]`` input; SiLU on CUDA in one Triton kernel."""

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in _ACTS:
            raise ValueError(f"unsupported hidden_act {name!r}; supported: {sorted(_ACTS)}")
        self.act = _ACTS[name]
        self.silu = _ACTS[name] is F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (tokens, 2 * inter) -> (tokens, inter)
        ops = fused_ops(x) if self.silu else None
        pending = take_delta(x)  # the gate_up layer's LoRA delta, when it left it to this kernel
        if ops is not None:
            return ops.silu_and_mul(x, delta=pending)
        if pending is not None:  # no kernel to fold it into: add it first
            x = pending.added_to(x)
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up
