"""Reference LoRA backend in plain PyTorch: one matmul pair per segment.

Works on CPU and CUDA; it is the numerical reference for the Triton kernels.
Each slot's true rank per slice is used (``A[slot, :r]``; rank 0 = no weights),
so zero padding and untargeted slices cost nothing. ``buf`` is (T, slices,
max_rank) in the input's dtype, zero on rows it does not compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraplex.lora.backends.base import LoRAStack
from loraplex.lora.batch import LoRABatch


def _segments(batch: LoRABatch):
    for s, e, slot in zip(batch.seg_starts, batch.seg_ends, batch.seg_slots):
        if slot >= 0:
            yield s, e, slot


def shrink_reference(x: torch.Tensor, w: LoRAStack, batch: LoRABatch) -> torch.Tensor:
    """``buf[t, i, :r] = x[t] @ A_i[slot(t), :r].T``; (T, in) -> (T, slices, max_rank), zero elsewhere."""
    buf = x.new_zeros(x.shape[0], w.num_slices, w.max_rank)  # (tokens, slices, rank)
    for s, e, slot in _segments(batch):
        for i, a in enumerate(w.a_slices):
            r = w.ranks[i][slot]
            if r:
                buf[s:e, i, :r] = x[s:e] @ a[slot, :r].T
    return buf


def expand_reference(y: torch.Tensor, buf: torch.Tensor, w: LoRAStack, batch: LoRABatch) -> None:
    """``y[t, off_i:off_i+n_i] += buf[t, i, :r] @ B_i[slot(t), :, :r].T * scale_i[slot(t)]``, in place."""
    for s, e, slot in _segments(batch):
        off = 0
        for i, (b, n) in enumerate(zip(w.b_slices, w.slices)):
            r = w.ranks[i][slot]
            if r:
                y[s:e, off:off + n] += (buf[s:e, i, :r] @ b[slot, :, :r].T) * w.scales[i][slot]
            off += n


def embed_reference(y: torch.Tensor, ids: torch.Tensor, w: LoRAStack, batch: LoRABatch) -> None:
    """``y[t] += A_t[slot(t)][ids[t], :r] @ B[slot(t), :, :r].T * scale[slot(t)]``, in place."""
    a_t, b = w.a_slices[0], w.b_slices[0]  # (slots, vocab, rank), (slots, hidden, rank)
    for s, e, slot in _segments(batch):
        r = w.ranks[0][slot]
        if r:
            after_a = F.embedding(ids[s:e], a_t[slot, :, :r])  # (seg, r)
            y[s:e] += (after_a @ b[slot, :, :r].T) * w.scales[0][slot]


class TorchLoRABackend:
    name = "torch"

    def shrink(self, x: torch.Tensor, w: LoRAStack, batch: LoRABatch) -> torch.Tensor:
        return shrink_reference(x, w, batch)

    def expand(self, y: torch.Tensor, buf: torch.Tensor, w: LoRAStack, batch: LoRABatch) -> None:
        expand_reference(y, buf, w, batch)

    def embed(self, y: torch.Tensor, ids: torch.Tensor, w: LoRAStack, batch: LoRABatch) -> None:
        embed_reference(y, ids, w, batch)
