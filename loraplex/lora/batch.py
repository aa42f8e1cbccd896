"""Token -> adapter-slot mapping for one batch, grouped into segments.

Built once per step by the model runner. A segment is a run of consecutive
rows (tokens, or logits rows) that use the same slot; slot ``-1`` means the base
model (no adapter), and such rows are left untouched by every LoRA wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class LoRABatch:
    seg_starts: list[int]
    seg_ends: list[int]
    seg_slots: list[int]
    token_slots: torch.Tensor  # (rows,) int64 on the device
    seg_indptr: torch.Tensor  # (segments + 1,) int64 on the device
    seg_slot_t: torch.Tensor  # (segments,) int64 on the device
    num_rows: int

    @property
    def used_slots(self) -> frozenset[int]:
        return frozenset(s for s in self.seg_slots if s >= 0)

    @classmethod
    def from_row_slots(cls, row_slots: Sequence[int], device: torch.device) -> "LoRABatch":
        starts: list[int] = []
        ends: list[int] = []
        slots: list[int] = []
        for i, s in enumerate(row_slots):
            if slots and slots[-1] == s:
                ends[-1] = i + 1
            else:
                starts.append(i)
                ends.append(i + 1)
                slots.append(int(s))
        indptr = torch.tensor(starts + [len(row_slots)], dtype=torch.int64)
        return cls(
            seg_starts=starts,
            seg_ends=ends,
            seg_slots=slots,
            token_slots=torch.tensor(list(row_slots), dtype=torch.int64).to(device),
            seg_indptr=indptr.to(device),
            seg_slot_t=torch.tensor(slots, dtype=torch.int64).to(device),
            num_rows=len(row_slots),
        )

    @classmethod
    def from_seq_slots(cls, seq_slots: Sequence[int], seq_lens: Sequence[int], device: torch.device) -> "LoRABatch":
        rows: list[int] = []
        for s, n in zip(seq_slots, seq_lens):
            rows.extend([s] * n)
        return cls.from_row_slots(rows, device)
