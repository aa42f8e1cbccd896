"""CUDA graphs of decode steps, and the persistent buffers they read.

A *decode step* gives every sequence exactly one new token at a position past its prompt's images and asks
for no prompt logprobs. Such a step of ``B`` sequences runs as the replay of a graph captured at start-up for
the smallest capture size ``>= B`` (1, 2, 4, 8, then multiples of 8 up to ``max_cudagraph_capture_size``), its
forward and the logits of every row inside. Each size has two graphs:

* ``base``: no adapter in the batch; the LoRA layers launch nothing;
* ``lora``: every LoRA layer runs its Triton kernels over work lists padded to the capture size (empty tiles
  have slot -1), so the batch's adapter mix is data in the buffers: a new mix never needs a re-capture.

The graphs read :class:`DecodeInputs`, device buffers that live as long as the engine. A step's inputs are
written into a pinned host twin (numpy, no per-token Python for the large fields) and moved by one
non-blocking copy. Rows past ``B`` are padding: token 0 at position 0 of a one-token sequence whose only
block is the *scratch block* (one block past the allocator's, never handed out), base model; they write only
the scratch block, and their logits are dropped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from loraplex.attention.metadata import AttentionMetadata
from loraplex.engine.context import ForwardContext
from loraplex.lora.batch import LoRABatch

logger = logging.getLogger("loraplex")

TILE_ROWS = 16  # rows per LoRA kernel tile in graph steps (decode segments are short)


def capture_sizes(largest: int) -> list[int]:
    """Batch sizes captured: 1, 2, 4, 8, then every multiple of 8, and ``largest`` itself."""
    sizes = [s for s in (1, 2, 4) if s < largest] + list(range(8, largest + 1, 8))
    if not sizes or sizes[-1] != largest:
        sizes.append(largest)
    return sizes


def is_decode_step(seqs: Sequence) -> bool:
    """Every sequence has one new token, past its prompt when the request has images, and no prompt
    logprobs (``seqs``: :class:`~loraplex.engine.scheduler.ScheduledSeq`)."""
    for s in seqs:
        if s.num_new_tokens != 1 or s.prompt_logprobs:
            return False
        if s.req.mm is not None and s.start < len(s.req.prompt_token_ids):
            return False
    return True


class DecodeInputs:
    """Persistent inputs of graph steps for up to ``size`` sequences, in one device buffer, with two pinned
    host twins used in turn (a twin is rewritten only after its last copy has run)."""

    def __init__(self, size: int, max_blocks: int, mrope: bool, block_size: int, scratch_block: int,
                 device: torch.device) -> None:
        self.size = size
        self.max_blocks = max_blocks
        self.mrope = mrope
        self.block_size = block_size
        self.scratch_block = scratch_block
        N = size
        layout = [("input_ids", np.int64, (N,)), ("positions", np.int64, (3, N) if mrope else (N,)),
                  ("slot_mapping", np.int64, (N,)), ("token_slots", np.int64, (N,)), ("tiles", np.int64, (N, 3)),
                  ("seq_lens", np.int32, (N,)), ("query_start_loc", np.int32, (N + 1,)),
                  ("block_tables", np.int32, (N, max_blocks))]
        self._fields: list[tuple[str, np.dtype, tuple, int]] = []
        offset = 0
        for name, dt, shape in layout:  # every int64 field precedes the int32 ones: all aligned
            self._fields.append((name, np.dtype(dt), shape, offset))
            offset += int(np.prod(shape)) * np.dtype(dt).itemsize
        self.nbytes = offset
        self.device_buf = torch.zeros(offset, dtype=torch.uint8, device=device)
        pin = device.type == "cuda"
        self._host = [torch.zeros(offset, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self._host_np = [self._views(h.numpy()) for h in self._host]
        self._copied: list[Optional[torch.cuda.Event]] = [None, None]
        self._turn = 0
        self.dev = {name: self._torch_view(name) for name, *_ in self._fields}
        for h in self._host_np:
            h["query_start_loc"][:] = np.arange(N + 1, dtype=np.int32)  # one token per sequence, always
        self.pad()

    def _views(self, buf: np.ndarray) -> dict[str, np.ndarray]:
        return {name: buf[off:off + int(np.prod(shape)) * dt.itemsize].view(dt).reshape(shape)
                for name, dt, shape, off in self._fields}

    def _torch_view(self, name: str) -> torch.Tensor:
        for n, dt, shape, off in self._fields:
            if n == name:
                part = self.device_buf[off:off + int(np.prod(shape)) * dt.itemsize]
                return part.view(torch.int64 if dt == np.int64 else torch.int32).view(shape)
        raise KeyError(name)

    def _next_host(self) -> tuple[int, dict[str, np.ndarray]]:
        turn = self._turn
        self._turn ^= 1
        ev = self._copied[turn]
        if ev is not None:
            ev.synchronize()  # the copy that last read this twin has run (long done in practice)
        return turn, self._host_np[turn]

    def _pad_rows(self, h: dict[str, np.ndarray], start: int) -> None:
        h["input_ids"][start:] = 0
        h["positions"][..., start:] = 0
        h["slot_mapping"][start:] = self.scratch_block * self.block_size
        h["token_slots"][start:] = -1
        h["seq_lens"][start:] = 1
        h["block_tables"][start:, 0] = self.scratch_block

    def _copy(self, turn: int) -> None:
        self.device_buf.copy_(self._host[turn], non_blocking=True)
        if self.device_buf.is_cuda:
            ev = torch.cuda.Event()
            ev.record()
            self._copied[turn] = ev

    def pad(self) -> None:
        """Fill every row with padding (capture and warm-up run on this)."""
        turn, h = self._next_host()
        self._pad_rows(h, 0)
        h["tiles"][:] = (0, 0, -1)
        self._copy(turn)

    def fill(self, seqs: Sequence) -> None:
        """Write the inputs of the decode step ``seqs`` (sorted by adapter slot, as the scheduler leaves them)
        and start their copy to the device. Host work is O(B) plus each block table's new blocks."""
        B = len(seqs)
        assert 0 < B <= self.size, f"{B} sequences for decode buffers of {self.size}"
        turn, h = self._next_host()
        pos = np.fromiter((s.start for s in seqs), np.int64, B)
        slots = np.fromiter((s.req.slot for s in seqs), np.int64, B)
        h["input_ids"][:B] = [s.req.token_ids_at(s.start, 1)[0] for s in seqs]
        if self.mrope:
            h["positions"][:, :B] = pos + np.fromiter(
                (s.req.mm.mrope_delta if s.req.mm is not None else 0 for s in seqs), np.int64, B)
        else:
            h["positions"][:B] = pos
        tables = h["block_tables"]
        for i, s in enumerate(seqs):
            t = s.req.block_table_array()
            tables[i, :t.shape[0]] = t
        blocks = tables[np.arange(B), pos // self.block_size].astype(np.int64)
        h["slot_mapping"][:B] = blocks * self.block_size + pos % self.block_size
        h["seq_lens"][:B] = pos + 1
        h["token_slots"][:B] = slots
        self._pad_rows(h, B)
        # LoRA tiles: each run of equal slots cut into pieces of TILE_ROWS rows; row_end is the run's end.
        rows = np.arange(B)
        new_run = np.ones(B, dtype=bool)
        new_run[1:] = slots[1:] != slots[:-1]
        run_start = np.maximum.accumulate(np.where(new_run, rows, 0))
        run_id = np.cumsum(new_run) - 1
        run_end = np.append(rows[new_run][1:], B)[run_id]
        first = rows[(rows - run_start) % TILE_ROWS == 0]
        tiles = h["tiles"]
        n = first.shape[0]
        tiles[:n, 0] = first
        tiles[:n, 1] = run_end[first]
        tiles[:n, 2] = slots[first]
        tiles[n:] = (0, 0, -1)
        self._copy(turn)

    # -- the forward context of a graph of ``n`` rows ------------------------------------------------
    def context(self, n: int, lora: bool, max_model_len: int) -> ForwardContext:
        d = self.dev
        attn = AttentionMetadata(query_start_loc=d["query_start_loc"][:n + 1], seq_lens=d["seq_lens"][:n],
                                 block_tables=d["block_tables"][:n], slot_mapping=d["slot_mapping"][:n],
                                 max_query_len=1, max_seq_len=max_model_len, num_decodes=n)
        batch = None
        if lora:
            tiles = d["tiles"][:n]
            zero = d["token_slots"][:0]
            batch = LoRABatch(seg_starts=[], seg_ends=[], seg_slots=[], token_slots=d["token_slots"][:n],
                              seg_indptr=zero, seg_slot_t=zero, num_rows=n, block_m=TILE_ROWS, tiles=tiles,
                              expand_block_m=TILE_ROWS, expand_tiles=tiles, static=True)
        positions = d["positions"][:, :n] if self.mrope else d["positions"][:n]
        return ForwardContext(positions=positions, attn=attn, lora=batch, lora_logits=batch)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # (n, padded vocab) float32, written by each replay


class DecodeGraphs:
    """The captured decode graphs of one model runner.

    ``forward(input_ids, ctx)`` runs the model and returns float32 logits of every row; it is called eagerly
    to warm up (Triton compiles), then under capture. ``lora``: capture the adapter variants too."""

    def __init__(self, inputs: DecodeInputs, forward: Callable[[torch.Tensor, ForwardContext], torch.Tensor],
                 sizes: list[int], lora: bool, max_model_len: int) -> None:
        self.inputs = inputs
        self.sizes = sorted(sizes)
        self.lora = lora
        self._forward = forward
        self._max_model_len = max_model_len
        self._graphs: dict[tuple[int, bool], _Graph] = {}
        self.capture_seconds = 0.0
        self.memory_bytes = 0

    def size_for(self, batch: int) -> Optional[int]:
        for s in self.sizes:
            if s >= batch:
                return s
        return None

    @torch.inference_mode()
    def capture(self) -> None:
        dev = self.inputs.device_buf.device
        torch.cuda.synchronize(dev)
        free0 = torch.cuda.mem_get_info(dev)[0]
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        self.inputs.pad()
        for lora in ((False, True) if self.lora else (False,)):
            for n in reversed(self.sizes):  # largest first: the smaller graphs reuse its pool memory
                ctx = self.inputs.context(n, lora, self._max_model_len)
                ids = self.inputs.dev["input_ids"][:n]
                for _ in range(2):  # compile every kernel and settle the allocator before capture
                    self._forward(ids, ctx)
                torch.cuda.synchronize(dev)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                    logits = self._forward(ids, ctx)
                self._graphs[(n, lora)] = _Graph(g, logits)
        torch.cuda.synchronize(dev)
        self.capture_seconds = time.perf_counter() - t0
        self.memory_bytes = max(0, free0 - torch.cuda.mem_get_info(dev)[0])
        logger.info("loraplex: captured %d CUDA graphs (decode batch sizes %s%s) in %.1f s, %.0f MiB",
                    len(self._graphs), self.sizes, ", with and without adapters" if self.lora else "",
                    self.capture_seconds, self.memory_bytes / 2**20)

    def run(self, seqs: Sequence, fix_inputs: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
        """Fill the inputs of the decode step ``seqs`` and replay its graph: float32 logits (B, padded vocab),
        a view of the graph's output valid until the next replay. ``fix_inputs(input_ids)`` may then amend
        the token ids on the device (tokens sampled by a step still in flight)."""
        n = self.size_for(len(seqs))
        assert n is not None, f"no graph for {len(seqs)} sequences"
        lora = self.lora and any(s.req.slot >= 0 for s in seqs)
        self.inputs.fill(seqs)
        if fix_inputs is not None:
            fix_inputs(self.inputs.dev["input_ids"])
        g = self._graphs.get((n, lora))
        if g is None:  # not captured (CPU tests of the buffers): the forward a graph records, run eagerly
            return self._forward(self.inputs.dev["input_ids"][:n],
                                 self.inputs.context(n, lora, self._max_model_len))[:len(seqs)]
        g.graph.replay()
        return g.logits[:len(seqs)]
