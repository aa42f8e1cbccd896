"""The flat variable-length layout every attention backend reads.

A step holds ``T`` new tokens of ``B`` sequences, each sequence's tokens contiguous: sequence ``b`` owns
query rows ``query_start_loc[b]:query_start_loc[b+1]``, and after this step it has ``seq_lens[b]`` tokens
in the paged cache (new ones included), so its new tokens sit at positions
``seq_lens[b] - query_len[b] ... seq_lens[b] - 1``. Decodes (one new token) come first when the scheduler
puts them there; ``num_decodes`` counts that leading run (kernels may give it a split-K decode path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from loraplex.transfer import to_device


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass
class AttentionMetadata:
    """Paged-attention layout of one step; the device tensors are built once and shared by every layer.

    Host ints (``max_query_len``, ``max_seq_len``, ``num_decodes``) size kernel grids without a sync;
    the host lists serve the CPU reference, which splits the batch per sequence.
    """

    query_start_loc: torch.Tensor  # (B + 1,) int32: first query row of each sequence, then T
    seq_lens: torch.Tensor  # (B,) int32: tokens in the cache after this step
    block_tables: torch.Tensor  # (B, max_blocks) int32: physical block of each logical block (padding: 0)
    slot_mapping: torch.Tensor  # (T,) int64: cache slot of each new token = block * block_size + offset
    max_query_len: int
    max_seq_len: int
    num_decodes: int = 0  # sequences 0 .. num_decodes - 1 have exactly one new token
    host_query_start_loc: Optional[Sequence[int]] = None  # the same as query_start_loc, on the host
    host_seq_lens: Optional[Sequence[int]] = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    def host_lists(self) -> tuple[Sequence[int], Sequence[int]]:
        """(query_start_loc, seq_lens) as host ints (a device copy only if prepare did not give them)."""
        qsl = self.host_query_start_loc
        lens = self.host_seq_lens
        if qsl is None:
            qsl = self.query_start_loc.tolist()
        if lens is None:
            lens = self.seq_lens.tolist()
        return qsl, lens

    @classmethod
    def build(cls, query_lens: Sequence[int], seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
              block_size: int, device: torch.device) -> "AttentionMetadata":
        """The layout of sequences with these new-token counts, cache lengths and block tables (host lists or
        int32 numpy arrays): one host tensor holding every int32 field, one copy to ``device``."""
        B = len(query_lens)
        assert B == len(seq_lens) == len(block_tables) and B > 0, "one query length, length and table per sequence"
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        # Fields start on 16-byte boundaries and rows of the block table are a multiple of 16 entries: the
        # kernels that read them are compiled once, not once per alignment or width (Triton specialises on both)
        max_blocks = _round_up(max(1, max(len(t) for t in block_tables)), 16)
        lens_at = _round_up(B + 1, 4)
        tables_at = lens_at + _round_up(B, 4)
        # [query_start_loc (B+1) | seq_lens (B) | block_tables (B * max_blocks)], int32, copied at once
        host = torch.zeros(tables_at + B * max_blocks, dtype=torch.int32)
        host[:B + 1] = torch.tensor(qsl, dtype=torch.int32)
        host[lens_at:lens_at + B] = torch.tensor(list(seq_lens), dtype=torch.int32)
        tables = host[tables_at:].view(B, max_blocks).numpy()
        for b, t in enumerate(block_tables):  # numpy rows (Request.block_table_array) copy without Python ints
            if len(t):
                tables[b, :len(t)] = t
        parts = []
        for b, (n, L) in enumerate(zip(query_lens, seq_lens)):
            pos = np.arange(L - n, L)
            parts.append(tables[b, pos // block_size].astype(np.int64) * block_size + pos % block_size)
        slots = torch.from_numpy(np.concatenate(parts))
        dev = to_device(host, torch.device(device))  # pinned: a pageable copy would wait for the device's queue
        num_decodes = 0
        while num_decodes < B and query_lens[num_decodes] == 1:
            num_decodes += 1
        return cls(
            query_start_loc=dev[:B + 1], seq_lens=dev[lens_at:lens_at + B],
            block_tables=dev[tables_at:].view(B, max_blocks),
            slot_mapping=to_device(slots, torch.device(device)),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens), num_decodes=num_decodes,
            host_query_start_loc=qsl, host_seq_lens=list(seq_lens),
        )
