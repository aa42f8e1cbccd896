"""Token -> adapter-slot mapping for one batch, grouped into segments.

Built once per step by the model runner. A segment is a run of consecutive
rows (tokens, or logits rows) that use the same slot; slot ``-1`` means the base
model (no adapter), and such rows are left untouched by every LoRA wrapper.

The batch also carries the work lists of the Triton kernels (``tiles`` for the
shrink, ``expand_tiles`` for the expand): every segment cut into pieces of at
most ``block_m`` (``expand_block_m``) rows. All device metadata
travels in one host-to-device copy, made here, before the forward, so that no
LoRA layer copies or synchronises during it.
"""

from __future__ import annotations

import array
import functools
import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from loraplex.transfer import to_device


def block_m_for(max_seg_len: int) -> tuple[int, int]:
    """Rows per kernel tile (shrink, expand): 16 for decode-shaped batches (a few rows per segment); for
    prefill, 64 for the shrink and 32 for the expand, whose tiles also span up to 256 output columns (best
    measured on an H100)."""
    if max_seg_len <= 16:
        return 16, 16
    if max_seg_len <= 32:
        return 32, 32
    return 64, 32


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
    expand_block_m: int = 16
    expand_tiles: Optional[torch.Tensor] = None  # as ``tiles``, pieces of ``expand_block_m`` rows
    # A batch of a captured CUDA graph: persistent device buffers, work lists padded with empty tiles (slot -1),
    # host fields empty. Every LoRA layer runs its kernels, whatever the adapter mix of the replayed step.
    static: bool = False
    # Static batches: (1,) int64 on the device, how many of the first tiles (of ``tiles``, which is then also
    # ``expand_tiles``) are real; the kernels read no tile past it. None: all of them.
    tile_count: Optional[torch.Tensor] = None

    def runs(self, active: frozenset[int]) -> bool:
        """Whether a layer holding weights in the slots ``active`` has work in this batch."""
        return self.static or bool(self.used_slots & active)

    @functools.cached_property
    def used_slots(self) -> frozenset[int]:
        """Adapter slots of this batch (every LoRA layer asks, once per forward)."""
        return frozenset(s for s in self.seg_slots if s >= 0)

    @functools.cached_property
    def plans(self) -> dict:
        """Memo for work plans a backend derives from this batch on the host (the torch backend's
        slot-grouped tiles, one per set of slots a layer holds weights for); it lives as long as the batch."""
        return {}

    def tiles_for(self, block_m: int) -> torch.Tensor:
        """The work list for any tile height. Copies to the device unless it is one of the batch's own:
        call it outside a forward."""
        if block_m == self.block_m and self.tiles is not None:
            return self.tiles
        if block_m == self.expand_block_m and self.expand_tiles is not None:
            return self.expand_tiles
        flat = segment_tiles(self.seg_starts, self.seg_ends, self.seg_slots, block_m)
        return torch.tensor(flat, dtype=torch.int64).view(-1, 3).to(self.token_slots.device)

    @classmethod
    def from_row_slots(cls, row_slots: Sequence[int], device: torch.device) -> "LoRABatch":
        starts: list[int] = []
        ends: list[int] = []
        slots: list[int] = []
        n = 0
        for slot, run in itertools.groupby(row_slots):  # C-speed runs: prefill steps have thousands of rows
            starts.append(n)
            n += sum(1 for _ in run)
            ends.append(n)
            slots.append(int(slot))
        max_len = max((e - s for s, e in zip(starts, ends)), default=0)
        block_m, expand_block_m = block_m_for(max_len)
        tiles = segment_tiles(starts, ends, slots, block_m)
        etiles = segment_tiles(starts, ends, slots, expand_block_m) if expand_block_m != block_m else []
        # One host buffer, one copy: token slots | indptr | segment slots | tiles | expand tiles, each part
        # starting on a 16-byte boundary (the kernels are specialised on pointer alignment: a part at an odd
        # offset would compile another variant of them mid-serving)
        nseg = len(slots)
        host = array.array("q")
        offsets = []
        for part in (row_slots, starts + [n], slots, tiles, etiles):
            if len(host) % 2:
                host.append(0)
            offsets.append(len(host))
            host.extend(part)
        packed = torch.frombuffer(host, dtype=torch.int64) if len(host) else torch.empty(0, dtype=torch.int64)
        # pinned, so the copy does not wait for the device's queued work (a pageable copy would)
        packed = to_device(packed, torch.device(device)) if torch.device(device).type != "cpu" else packed.clone()
        rows_at, indptr_at, slots_at, tiles_at, etiles_at = offsets
        tiles_t = packed[tiles_at:tiles_at + len(tiles)].view(-1, 3)
        return cls(
            seg_starts=starts,
            seg_ends=ends,
            seg_slots=slots,
            token_slots=packed[rows_at:rows_at + n],
            seg_indptr=packed[indptr_at:indptr_at + nseg + 1],
            seg_slot_t=packed[slots_at:slots_at + nseg],
            num_rows=n,
            max_seg_len=max_len,
            block_m=block_m,
            tiles=tiles_t,
            expand_block_m=expand_block_m,
            expand_tiles=packed[etiles_at:].view(-1, 3) if etiles else tiles_t,
        )

    @classmethod
    def from_seq_slots(cls, seq_slots: Sequence[int], seq_lens: Sequence[int], device: torch.device) -> "LoRABatch":
        rows: list[int] = []
        for s, n in zip(seq_slots, seq_lens):
            rows.extend([s] * n)
        return cls.from_row_slots(rows, device)
