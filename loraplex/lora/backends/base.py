"""LoRA backend interface and registry.

A backend computes the batched LoRA delta in two steps (punica's split):

    shrink: buf[t, i, :r] = x[t] @ A_i[slot(t)][:r].T          for every slice i
    expand: y[t, off_i:off_i+n_i] += buf[t, i, :r] @ B_i[slot(t)][:, :r].T * scale_i[slot(t)]

with ``r = ranks[i][slot]`` (0: the slot has no weights for slice i), for rows
``t`` whose slot is in ``active`` (slots that hold weights for this
layer); other rows, base-model rows (slot -1) included, are left untouched.
Row-parallel layers all-reduce ``buf`` between the two steps.
"""

from __future__ import annotations

import importlib
from typing import Protocol, Sequence

import torch

from loraplex.lora.batch import LoRABatch


class LoRABackend(Protocol):
    name: str

    def shrink(self, x: torch.Tensor, lora_a: Sequence[torch.Tensor], ranks: Sequence[Sequence[int]],
               batch: LoRABatch, active: frozenset[int]) -> torch.Tensor:
        """x (T, in), lora_a[i] (slots, max_rank, in) -> buf (T, slices, max_rank)."""

    def expand(self, y: torch.Tensor, buf: torch.Tensor, lora_b: Sequence[torch.Tensor],
               scales: Sequence[Sequence[float]], ranks: Sequence[Sequence[int]], slices: Sequence[int],
               batch: LoRABatch, active: frozenset[int]) -> None:
        """y (T, sum(slices)) += per-slice buf @ B.T * scale, in place."""

    def embed(self, y: torch.Tensor, ids: torch.Tensor, lora_a_t: torch.Tensor, lora_b: torch.Tensor,
              scales: Sequence[float], ranks: Sequence[int], batch: LoRABatch, active: frozenset[int]) -> None:
        """y (T, hidden) += lora_a_t[slot][ids, :r] @ lora_b[slot][:, :r].T * scale[slot], in place."""


_BACKENDS = {
    "torch": ("loraplex.lora.backends.torch_backend", "TorchLoRABackend"),
}


def get_backend(name: str) -> LoRABackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r}; available: {sorted(_BACKENDS)}")
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)()
