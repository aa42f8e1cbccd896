"""RMSNorm computed in float32 and cast back, as Hugging Face Llama/Qwen do, optionally fused with the
residual addition before it (``x + residual``, rounded to the dtype as the model's addition is). On CUDA one
Triton kernel does both (:func:`loraplex.kernels.layer_ops.rms_norm`)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from loraplex.engine.context import take_delta
from loraplex.layers.fused import fused_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``norm(x)``; with ``residual``: ``(norm(x + residual), x + residual)``. A LoRA delta left pending for
        ``x`` by the layer that wrote it (``lora_delta_consumers``) is added to ``x`` first."""
        ops = fused_ops(x)
        pending = take_delta(x)
        if ops is not None:
            if residual is None:
                return ops.rms_norm(x, self.weight, self.eps, delta=pending)
            residual = residual if residual.is_contiguous() else residual.contiguous()
            return ops.rms_norm(x, self.weight, self.eps, residual, delta=pending), residual
        if pending is not None:  # no kernel to fold it into: add it first
            x = pending.added_to(x)
        if residual is not None:
            residual = x + residual
            x = residual
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)
