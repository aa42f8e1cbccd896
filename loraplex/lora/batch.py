"""Token -> adapter-slot mapping for one batch, grouped into segments.

Built once per step by the model runner. A segment is a run of consecutive
rows (tokens, or logits rows) that use the same slot; slot ``-1`` means the base
model (no adapter), and such rows are left untouched by every LoRA wrapper.

The batch also carries the work list of the Triton kernels (``tiles``): every
segment cut into pieces of at most ``block_m`` rows. All device metadata
travels in one host-to-device copy, made here, before the forward, so that no
LoRA layer copies or synchronises during it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


def block_m_for(max_seg_len: int) -> int:
    """Rows per kernel tile: 16 for decode-shaped batches (a few rows per segment), up to 64 for prefill."""
    if max_seg_len <= 16:
        return 16
    if max_seg_len <= 32:
        return 32
    return 64


def segment_tiles(starts: Sequence[int], ends: Sequence[int], slots: Sequence[int], block_m: int) -> list[int]:
    """Flat ``[row_start, row_end, slot] * num_tiles``: each segment cut into pieces of ``block_m`` rows;
    ``row_end`` is the segment's end (a kernel masks rows ``>= row_end``)."""
    out: list[int] = []
    for s, e, slot in zip(starts, ends, slots):
        for m in range(s, e, block_m):
            out += (m, e, slot)
    return out


@dataclass
class LoRABatch:
    seg_starts: list[int]
    seg_ends: list[int]
    seg_slots: list[int]
    token_slots: torch.Tensor  # (rows,) int64 on the device
    seg_indptr: torch.Tensor  # (segments + 1,) int64 on the device
    seg_slot_t: torch.Tensor  # (segments,) int64 on the device
    num_rows: int
    max_seg_len: int = 0
    block_m: int = 16  # rows per tile of ``tiles``
    tiles: Optional[torch.Tensor] = None  # (num_tiles, 3) int64 on the device: row_start, row_end, slot

    @property
    def used_slots(self) -> frozenset[int]:
        return frozenset(s for s in self.seg_slots if s >= 0)

    def tiles_for(self, block_m: int) -> torch.Tensor:
        """The work list for another tile height. Copies to the device: call it outside a forward."""
        if block_m == self.block_m and self.tiles is not None:
            return self.tiles
        flat = segment_tiles(self.seg_starts, self.seg_ends, self.seg_slots, block_m)
        return torch.tensor(flat, dtype=torch.int64).view(-1, 3).to(self.token_slots.device)

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
        n = len(row_slots)
        max_len = max((e - s for s, e in zip(starts, ends)), default=0)
        block_m = block_m_for(max_len)
        tiles = segment_tiles(starts, ends, slots, block_m)
        # One host tensor, one copy: token slots | indptr | segment slots | tiles.
        packed = torch.tensor(list(row_slots) + starts + [n] + slots + tiles, dtype=torch.int64)
        packed = packed.to(device)
        nseg = len(slots)
        a, b, c = n, n + nseg + 1, n + 2 * nseg + 1
        return cls(
            seg_starts=starts,
            seg_ends=ends,
            seg_slots=slots,
            token_slots=packed[:a],
            seg_indptr=packed[a:b],
            seg_slot_t=packed[b:c],
            num_rows=n,
            max_seg_len=max_len,
            block_m=block_m,
            tiles=packed[c:].view(-1, 3),
        )

    @classmethod
    def from_seq_slots(cls, seq_slots: Sequence[int], seq_lens: Sequence[int], device: torch.device) -> "LoRABatch":
        rows: list[int] = []
        for s, n in zip(seq_slots, seq_lens):
            rows.extend([s] * n)
        return cls.from_row_slots(rows, device)
