"""Triton LoRA backend: one shrink and one expand launch per layer, whatever the adapter mix.

Each launch covers every slice (q/k/v, gate/up) and every segment of the batch;
per-slot ranks and scales are read from the wrapper's device mirrors and the
work lists from ``LoRABatch.tiles`` / ``expand_tiles``, so a forward makes no
host-device copy and no synchronisation. Runs on CUDA; on CPU only under ``TRITON_INTERPRET=1``
(tests). Reference: :mod:`loraplex.lora.backends.torch_backend`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from loraplex import envs
from loraplex.kernels.lora_embed import lora_embed_gather
from loraplex.kernels.lora_expand import PendingDelta, lora_expand
from loraplex.kernels.lora_shrink import lora_shrink
from loraplex.lora.backends.base import LoRAStack
from loraplex.lora.batch import LoRABatch


class TritonLoRABackend:
    name = "triton"
    fuses_extras = True
    page_rank = 8  # rank rows per page of the slots' memory (rank-aware: an adapter takes ceil(rank / 8) pages)

    def shrink(self, x: torch.Tensor, w: LoRAStack, batch: LoRABatch) -> torch.Tensor:
        """-> float32 split-K partials (splits, T, slices, max_rank); their sum over dim 0 is ``buf``."""
        # A graph's padded work list: size split-K for the fewest real tiles (one adapter over the batch).
        work = -(-batch.num_rows // batch.block_m) if batch.static else None
        return lora_shrink(x, w.a, w.ranks_t, batch.tiles, batch.block_m, work_tiles=work, pages=w.pages.table,
                           max_rank=w.max_rank, tile_count=batch.tile_count, reduce=self.reduce,
                           device_splits=self.device_splits)

    def __init__(self) -> None:
        # Run each shrink on a side stream beside the base layer's GEMM, which reads the same input, instead of
        # after it (inside CUDA graphs too: the fork and join are captured as graph edges). Measured on an H200
        # (docs/benchmarks.md): 0.45 ms less per decode step of the 8B shape with one adapter. On by default
        # with one rank; under tensor parallelism not yet run on GPUs, so off there unless
        # LORAPLEX_LORA_OVERLAP=1 (=0 turns it off everywhere).
        from loraplex.distributed.parallel_state import get_tp_size

        overlap = envs.LORAPLEX_LORA_OVERLAP
        self.overlap = overlap if overlap is not None else get_tp_size() == 1
        # The shrink sums its split-K partials itself (its last split per work cell), so that each expand
        # program reads one value per element instead of one per split; LORAPLEX_LORA_REDUCE=0 leaves the sum
        # to the expand (for comparison).
        self.reduce = envs.LORAPLEX_LORA_REDUCE
        # In CUDA graph steps the shrink sizes its split-K on the device from the real tile count: a graph is
        # sized for one adapter (16 splits at batch 32), and 32 distinct adapters would otherwise make 16 times
        # the items they need. Measured on an H200 (docs/benchmarks.md, 2026-12-01): with the side expand below,
        # 7.52 against 8.93 ms a step for 32 distinct adapters at batch 32. LORAPLEX_LORA_DEVICE_SPLITS=0: off.
        self.device_splits = envs.LORAPLEX_LORA_DEVICE_SPLITS
        # Batches of at most SIDE_EXPAND_ROWS rows run the expand too beside the base GEMM (with the shrink, when
        # overlap is on), into a float32 delta buffer, and the layer's output gets the delta by one small add
        # (lora_add_delta) after the join, so that only that add waits on the critical path. Measured on an
        # H200: 5.92 against 6.30 ms a step with one adapter at batch 32. LORAPLEX_LORA_SIDE_EXPAND=0: off.
        self.side_expand = envs.LORAPLEX_LORA_SIDE_EXPAND
        # The side expand's delta of the layers a model names in ``lora_delta_consumers`` (Llama: qkv_proj,
        # o_proj, down_proj, gate_up_proj) is folded into the rotary, norm or SiLU-and-mul kernel that reads their
        # output next, instead of being added by a kernel of its own: four launches a layer fewer on the
        # critical path. Measured on an H200 (8B shape, one adapter): 5.71 against 5.91 ms a decode step at batch
        # 32, 7.85 against 8.16 at batch 128. LORAPLEX_LORA_FOLD_DELTA=0: off.
        self.fold_deltas = envs.LORAPLEX_LORA_FOLD_DELTA
        self._side: dict[torch.device, torch.cuda.Stream] = {}

    def start_shrink(self, x: torch.Tensor, w: LoRAStack, batch: LoRABatch) -> Callable[[], torch.Tensor]:
        """Start :meth:`shrink` before the base layer runs; the returned call gives its result. With overlap on
        CUDA the shrink runs on a side stream that waits for ``x`` and that the current stream waits for when
        the result is taken; its buffers are allocated on the side stream, which next waits for the current one
        (the next layer's fork) before reusing them, so no block is reused while the other stream reads it."""
        if not (self.overlap and x.is_cuda):
            buf = self._lora(x, w, batch)
            return lambda: buf
        main = torch.cuda.current_stream(x.device)
        side = self._side.get(x.device)
        if side is None:
            side = self._side[x.device] = torch.cuda.Stream(x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            buf = self._lora(x, w, batch)

        def join() -> torch.Tensor:
            main.wait_stream(side)
            return buf

        return join

    def _lora(self, x: torch.Tensor, w: LoRAStack, batch: LoRABatch):
        """What :meth:`start_shrink` starts: the shrink, and with ``side_expand`` the expand into a delta."""
        buf = self.shrink(x, w, batch)
        if not self.side_expand or x.shape[0] > SIDE_EXPAND_ROWS:
            return buf
        delta = torch.empty(x.shape[0], w.b.shape[1], dtype=torch.float32, device=x.device)
        lora_expand(delta, buf, w.b, w.ranks_t, w.scales_t, w.slice_meta, max(w.slices), batch.expand_tiles,
                    batch.expand_block_m, pages=w.pages.table, tile_count=batch.tile_count, delta=True,
                    aligned=w.aligned)
        return _Delta(delta)

    def expand(self, y: torch.Tensor, buf, w: LoRAStack, batch: LoRABatch,
               bias: Optional[torch.Tensor] = None) -> None:
        if isinstance(buf, _Delta):  # expanded beside the GEMM: add it
            _pending(buf, w, batch, bias).apply(y)
            return
        lora_expand(y, buf, w.b, w.ranks_t, w.scales_t, w.slice_meta, max(w.slices), batch.expand_tiles,
                    batch.expand_block_m, _extras(w), bias, pages=w.pages.table, tile_count=batch.tile_count,
                    aligned=w.aligned)

    def expand_pending(self, y: torch.Tensor, buf, w: LoRAStack, batch: LoRABatch,
                       bias: Optional[torch.Tensor] = None) -> Optional[PendingDelta]:
        """:meth:`expand`, but a delta expanded beside the GEMM is returned for the next kernel to fold in
        (``y`` left as the base output) instead of added; None when the expand was done in place."""
        if not isinstance(buf, _Delta):
            self.expand(y, buf, w, batch, bias)
            return None
        return _pending(buf, w, batch, bias)

    def embed(self, y: torch.Tensor, ids: torch.Tensor, w: LoRAStack, batch: LoRABatch) -> None:
        buf = lora_embed_gather(ids.reshape(-1), batch.token_slots, w.a[0], w.ranks_t[0], pages=w.pages.table)
        lora_expand(y.view(-1, y.shape[-1]), buf, w.b, w.ranks_t, w.scales_t, w.slice_meta, w.slices[0],
                    batch.expand_tiles, batch.expand_block_m, _extras(w), pages=w.pages.table,
                    tile_count=batch.tile_count, aligned=w.aligned)


SIDE_EXPAND_ROWS = 512  # a gate_up delta of 512 rows of the 8B shape: 59 MB of float32


class _Delta:
    """A layer's LoRA delta (rows, sum(slices)) float32, expanded beside its base GEMM (see ``side_expand``)."""

    __slots__ = ("delta",)

    def __init__(self, delta: torch.Tensor) -> None:
        self.delta = delta


def _pending(buf: _Delta, w: LoRAStack, batch: LoRABatch, bias: Optional[torch.Tensor]) -> PendingDelta:
    """The add of a delta expanded beside the GEMM (lora_add_delta's arguments but the output)."""
    return PendingDelta(buf.delta, batch.token_slots, w.ranks_t, w.slice_meta, max(w.slices), _extras(w), bias)


def _extras(w: LoRAStack) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    return None if w.ext is None else (w.ext, w.pages.ext_rows)
