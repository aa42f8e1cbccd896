"""Reference LoRA backend in plain PyTorch: one matmul pair per segment.

Works on CPU and CUDA; it is the numerical reference for the Triton kernels.
Each slot's true rank per slice is used (``A[slot, :r]``; rank 0 = no weights),
so zero padding and untargeted slices cost nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from loraplex.lora.batch import LoRABatch


class TorchLoRABackend:
    name = "torch"

    @staticmethod
    def _segments(batch: LoRABatch, active: frozenset[int]):
        for s, e, slot in zip(batch.seg_starts, batch.seg_ends, batch.seg_slots):
            if slot in active:
                yield s, e, slot

    def shrink(self, x, lora_a, ranks, batch, active):
        T = x.shape[0]
        max_rank = lora_a[0].shape[1]
        buf = x.new_zeros(T, len(lora_a), max_rank)  # (tokens, slices, rank)
        for s, e, slot in self._segments(batch, active):
            for i, a in enumerate(lora_a):
                r = ranks[i][slot]
                if r:
                    buf[s:e, i, :r] = x[s:e] @ a[slot, :r].T
        return buf

    def expand(self, y, buf, lora_b, scales, ranks, slices, batch, active):
        for s, e, slot in self._segments(batch, active):
            off = 0
            for i, (b, n) in enumerate(zip(lora_b, slices)):
                r = ranks[i][slot]
                if r:
                    y[s:e, off:off + n] += (buf[s:e, i, :r] @ b[slot, :, :r].T) * scales[i][slot]
                off += n

    def embed(self, y, ids, lora_a_t, lora_b, scales, ranks, batch, active):
        for s, e, slot in self._segments(batch, active):
            r = ranks[slot]
            after_a = F.embedding(ids[s:e], lora_a_t[slot, :, :r])  # (seg, r)
            y[s:e] += (after_a @ lora_b[slot, :, :r].T) * scales[slot]
