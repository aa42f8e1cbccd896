"""CUDA graphs of engine steps, and the persistent buffers they read.

A step without images in its chunks and without prompt logprobs runs as the replay of a graph captured at
start-up, when one is large enough for it. Two families of graphs:

* **decode**: every sequence has one new token. One graph per batch size (1, 2, 4, 8, then multiples of 8
  up to ``max_cudagraph_capture_size``); padding rows are one-token sequences. Long contexts of small
  batches take the split-K decode attention kernel.
* **mixed**: prompt chunks with or without decodes (a server admitting requests one by one runs many of
  these). One graph per token count n (powers of two from 16 to 2,048, ``LORAPLEX_MIXED_GRAPH_TOKENS``,
  and every multiple of 64 up to 512; at most ``max_num_batched_tokens``), with n sequence slots: the real
  sequences, one one-token sequence per padding token, then empty ones; and ``max_num_seqs`` logits rows: only
  the last token of each sequence gets logits.

Each size has two graphs:

* ``base``: no adapter in the batch; the LoRA layers launch nothing; the graph runs the whole step, from the
  token ids to the logits;
* ``lora``: every LoRA layer runs its Triton kernels over work lists padded to the graph's size (empty tiles
  have slot -1), so the batch's adapter mix is data in the buffers: a new mix never needs a re-capture. DoRA
  and LoRA bias are data too (the expand kernel applies them). The graph holds the decoder layers only: the
  input embedding runs eagerly into a persistent buffer before the replay and the output head eagerly on the
  graph's hidden rows after it, so that the per-segment terms an adapter may bring there (trainable tokens,
  its own trained ``embed_tokens`` / ``lm_head`` tables, a wider vocabulary) apply as on eager steps. That
  costs the host a few launches a step, none of them a synchronisation.

The graphs read :class:`StepInputs`, device buffers that live as long as the engine. A step's inputs are
written into a pinned host twin (numpy: no per-token Python for the large fields) and moved by one
non-blocking copy. Padding tokens sit in the *scratch block* (one block past the allocator's, never handed
out): they write only there, and their logits are dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from loraplex import envs
from loraplex.attention.metadata import AttentionMetadata
from loraplex.engine.context import ForwardContext
from loraplex.lora.batch import LoRABatch

logger = logging.getLogger("loraplex")

TILE_ROWS = 16  # rows per LoRA kernel tile in graph steps
# Mixed steps of more tokens run eagerly (LORAPLEX_MIXED_GRAPH_TOKENS, default 2,048: the default step budget,
# max_num_batched_tokens, so that by default only steps with images or prompt logprobs run eagerly). An eager
# step of the 8B shape costs 20-30 ms of host time (about 44,000 Python calls, 225 kernel launches), as long as
# the GPU's work for a 2,000-token step, and 55-75 ms while other threads hold the GIL: on an H200 with 1,000
# adapters a cold start's steps of 4-7 prompt chunks took 65 ms at the median against 11 ms graphed, and the
# graphs to 2,048 took cold starts from 0.66-0.87 to 0.91-0.95 of one adapter's throughput (0.98-0.99 warm).
MAX_MIXED_TOKENS = envs.LORAPLEX_MIXED_GRAPH_TOKENS
# A mixed step replays the smallest graph that holds it and computes every padding token: on an H200 (8B shape)
# a step of 316 tokens took as long as one of 444 in the 512-token graph (15 ms against 6.6 ms for decodes
# alone). So there is a graph at every multiple of LORAPLEX_MIXED_GRAPH_STEP too (default 64; a multiple of 16:
# the kernels' specialisations stay those of the powers of two; 0: powers of two only): with 1,000 adapters on
# an H200 it took the load from 0.86 to 0.96-0.98 of one adapter's throughput, for four more graphs at start-up.
MIXED_GRAPH_STEP = envs.LORAPLEX_MIXED_GRAPH_STEP
# The multiples of the step stop here; above it the sizes are powers of two only: such steps are rarer (groups
# of prompts admitted together) and would otherwise run eagerly at 25-75 ms of host time, so a coarse graph
# beats none, and two more sizes cost start-up little where multiples of 64 up to 2,048 would add 24. Multiples
# up to 1,024 were measured (H200, 8B, the server at 64 clients): 4 of 616 steps fell in 513-1,024 tokens and
# the server's throughput moved within its run-to-run spread (0.86 of offline against 0.84-0.89).
FINE_MIXED_TOKENS = 512


@contextlib.contextmanager
def preferred_blas(library: Optional[str]):
    """``torch.backends.cuda.preferred_blas_library(library)`` inside the block (None: unchanged), restored
    after it. A graph keeps the GEMM kernels chosen while it was captured, so a graph captured inside replays
    that library's kernels whatever the setting is later."""
    if library is None:
        yield
        return
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(library)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def capture_sizes(largest: int) -> list[int]:
    """Decode batch sizes captured: 1, 2, 4, 8, then every multiple of 8, and ``largest`` itself."""
    sizes = [s for s in (1, 2, 4) if s < largest] + list(range(8, largest + 1, 8))
    if not sizes or sizes[-1] != largest:
        sizes.append(largest)
    return sizes


def mixed_sizes(max_tokens: int, step: Optional[int] = None) -> list[int]:
    """Token counts of the mixed graphs: powers of two from 16 to ``min(MAX_MIXED_TOKENS, max_tokens)``, and
    with ``step`` (default ``MIXED_GRAPH_STEP``, 64; 0: none) every multiple of it up to there too, or up to
    ``FINE_MIXED_TOKENS`` when that is lower (``max_tokens`` itself when it is smaller than 16)."""
    step = MIXED_GRAPH_STEP if step is None else step
    if step % 16:
        raise ValueError(f"LORAPLEX_MIXED_GRAPH_STEP must be a multiple of 16, got {step}")
    top = min(MAX_MIXED_TOKENS, max_tokens)
    sizes = {16 << i for i in range(16) if 16 << i <= top}
    if step:
        sizes.update(range(step, min(top, FINE_MIXED_TOKENS) + 1, step))
    return sorted(sizes) or [top]


def is_graph_step(seqs: Sequence, lora: bool = True) -> bool:
    """No prompt logprobs, no chunk holding prompt positions of a request with images (its vision tower runs
    eagerly), and with ``lora`` False (no adapter graphs: the LoRA backend is not Triton, whose kernels the
    graphs hold) no adapter at all (``seqs``: :class:`~loraplex.engine.scheduler.ScheduledSeq`)."""
    for s in seqs:
        if s.prompt_logprobs:
            return False
        if not lora and s.slot >= 0:  # the slot, not the adapter: what every tensor-parallel rank knows
            return False
        if s.req.mm is not None and s.start < len(s.req.prompt_token_ids):
            return False
    return True


def is_decode_step(seqs: Sequence, lora: bool = True) -> bool:
    """A graph step whose sequences each have one new token."""
    return all(s.num_new_tokens == 1 for s in seqs) and is_graph_step(seqs, lora)


def _runs_to_tiles(slots: np.ndarray, out: np.ndarray) -> int:
    """``out`` (>= rows, 3) <- each run of equal adapter ``slots`` cut into pieces of TILE_ROWS rows, as
    ``(row_start, run_end, slot)`` (kernels mask rows past the run's end); the rest empty tiles. Runs of base
    rows (slot -1) get no tile: no LoRA kernel has work there. Returns the number of real tiles."""
    n_rows = slots.shape[0]
    rows = np.arange(n_rows)
    new_run = np.ones(n_rows, dtype=bool)
    new_run[1:] = slots[1:] != slots[:-1]
    run_start = np.maximum.accumulate(np.where(new_run, rows, 0))
    run_id = np.cumsum(new_run) - 1
    run_end = np.append(rows[new_run][1:], n_rows)[run_id]
    first = rows[((rows - run_start) % TILE_ROWS == 0) & (slots >= 0)]
    n = first.shape[0]
    out[:n, 0] = first
    out[:n, 1] = run_end[first]
    out[:n, 2] = slots[first]
    out[n:] = (0, 0, -1)
    return n


class StepInputs:
    """Persistent inputs of graph steps of up to ``tokens`` tokens and ``seqs`` sequences (``seqs`` logits
    rows), in one device buffer, with two pinned host twins used in turn (a twin is rewritten only after
    its last copy has run). ``decode``: the decode family's layout (one sequence per token, padding too)."""

    def __init__(self, tokens: int, seqs: int, max_blocks: int, mrope: bool, block_size: int, scratch_block: int,
                 device: torch.device, decode: bool, rows: Optional[int] = None) -> None:
        assert not decode or tokens == seqs, "decode graphs have one sequence per token"
        self.tokens = tokens
        self.seqs = seqs
        self.rows = rows or seqs  # logits rows (mixed graphs: one per real sequence)
        self.decode = decode
        self.max_blocks = max_blocks
        self.mrope = mrope
        self.block_size = block_size
        self.scratch_block = scratch_block
        T, S, R = tokens, seqs, self.rows
        layout = [("input_ids", np.int64, (T,)), ("positions", np.int64, (3, T) if mrope else (T,)),
                  ("slot_mapping", np.int64, (T,)), ("token_slots", np.int64, (T,)), ("tiles", np.int64, (T, 3)),
                  ("logits_indices", np.int64, (R,)), ("logits_slots", np.int64, (R,)),
                  ("logits_tiles", np.int64, (R, 3)), ("tile_count", np.int64, (1,)),
                  ("logits_tile_count", np.int64, (1,)),
                  ("seq_lens", np.int32, (S,)), ("query_start_loc", np.int32, (S + 1,)),
                  ("block_tables", np.int32, (S, max_blocks))]
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

    def _copy(self, turn: int) -> None:
        self.device_buf.copy_(self._host[turn], non_blocking=True)
        if self.device_buf.is_cuda:
            ev = torch.cuda.Event()
            ev.record()
            self._copied[turn] = ev

    def pad(self, size: Optional[int] = None) -> None:
        """Fill everything with padding for a graph of ``size`` tokens (capture and warm-up run on this)."""
        turn, h = self._next_host()
        self._write_padding(h, 0, 0, size or self.tokens)
        self._copy(turn)

    def _write_padding(self, h: dict[str, np.ndarray], T: int, B: int, size: int) -> None:
        """Tokens ``T..`` and sequences ``B..`` (and logits rows ``B..``) as padding, for a graph of ``size``
        tokens: each padding token a one-token sequence at position 0 of the scratch block (so no padding
        position or block index exceeds what one token needs), then empty sequences."""
        bs, scratch = self.block_size, self.scratch_block
        h["input_ids"][T:] = 0
        h["token_slots"][T:] = -1
        h["logits_indices"][B:] = 0
        h["logits_slots"][B:] = -1
        h["positions"][..., T:] = 0
        h["slot_mapping"][T:] = scratch * bs
        pad = size - T
        h["seq_lens"][B:B + pad] = 1
        h["query_start_loc"][B:B + pad + 1] = np.arange(T, size + 1, dtype=np.int32)
        h["block_tables"][B:B + pad, 0] = scratch
        h["seq_lens"][B + pad:] = 0
        h["query_start_loc"][B + pad + 1:] = size

    def fill(self, seqs: Sequence, size: int) -> None:
        """Write the inputs of the graph step ``seqs`` (sorted by adapter slot, as the scheduler leaves them)
        for the graph of ``size`` tokens, and start their copy to the device. Host work is O(tokens) in numpy
        plus each block table's new blocks."""
        B = len(seqs)
        ns = np.fromiter((s.num_new_tokens for s in seqs), np.int64, B)
        T = int(ns.sum())
        assert 0 < B <= self.rows and T <= size <= self.tokens and B + size - T <= self.seqs, \
            f"{B} sequences, {T} tokens for a graph of {size} tokens, {self.seqs} sequences"
        turn, h = self._next_host()
        starts = np.fromiter((s.start for s in seqs), np.int64, B)
        slots = np.fromiter((s.slot for s in seqs), np.int64, B)
        qsl = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(ns, out=qsl[1:])
        sid = np.repeat(np.arange(B), ns)  # the sequence of each token
        pos = starts[sid] + (np.arange(T) - qsl[:-1][sid])
        if T == B:
            h["input_ids"][:T] = [s.req.token_ids_at(s.start, 1)[0] for s in seqs]
        else:
            h["input_ids"][:T] = [t for s in seqs for t in s.req.token_ids_at(s.start, s.num_new_tokens)]
        if self.mrope:  # graph steps hold no image positions: every token at index + delta in all rows
            delta = np.fromiter((s.req.mm.mrope_delta if s.req.mm is not None else 0 for s in seqs), np.int64, B)
            h["positions"][:, :T] = pos + delta[sid]
        else:
            h["positions"][:T] = pos
        tables = h["block_tables"]
        for i, s in enumerate(seqs):
            t = s.req.block_table_array()
            tables[i, :t.shape[0]] = t
        blocks = tables[sid, pos // self.block_size].astype(np.int64)
        h["slot_mapping"][:T] = blocks * self.block_size + pos % self.block_size
        h["seq_lens"][:B] = starts + ns
        h["query_start_loc"][:B + 1] = qsl
        token_slots = slots[sid]
        h["token_slots"][:T] = token_slots
        h["logits_indices"][:B] = qsl[1:] - 1
        h["logits_slots"][:B] = slots
        self._write_padding(h, T, B, size)
        # tiles over the real rows only: a tile may reach its run's end, which must lie inside every graph
        # that holds the step (padding rows belong to no tile, so no kernel writes them)
        h["tile_count"][0] = _runs_to_tiles(token_slots, h["tiles"])
        h["logits_tile_count"][0] = _runs_to_tiles(slots, h["logits_tiles"])
        self._copy(turn)
        self.last_slots = (token_slots, slots)  # the eager embedding and head of an adapter step read them

    # -- the forward context of a graph ---------------------------------------------------------------
    def context(self, n: int, lora: bool, max_model_len: int) -> ForwardContext:
        """The context of a graph of ``n`` tokens, over its first ``n`` sequence slots: a step of B sequences and
        T >= B tokens takes B + (n - T) <= n of them (one per padding token). The attention kernel runs a program
        per sequence slot, so a mixed graph over all of them (``max_num_seqs`` + the largest graph's tokens) would
        pay for the largest graph in every small one."""
        d = self.dev
        S = n
        R = self.rows
        attn = AttentionMetadata(query_start_loc=d["query_start_loc"][:S + 1], seq_lens=d["seq_lens"][:S],
                                 block_tables=d["block_tables"][:S], slot_mapping=d["slot_mapping"][:n],
                                 max_query_len=1 if self.decode else n, max_seq_len=max_model_len,
                                 num_decodes=S if self.decode else 0)
        batch = logits_batch = None
        if lora:
            batch = _static_batch(d["token_slots"][:n], d["tiles"][:n], d["tile_count"])
            logits_batch = batch if self.decode else _static_batch(d["logits_slots"][:R], d["logits_tiles"][:R],
                                                                   d["logits_tile_count"])
        positions = d["positions"][:, :n] if self.mrope else d["positions"][:n]
        return ForwardContext(positions=positions, attn=attn, lora=batch, lora_logits=logits_batch)


def _static_batch(token_slots: torch.Tensor, tiles: torch.Tensor, tile_count: torch.Tensor) -> LoRABatch:
    zero = token_slots[:0]
    return LoRABatch(seg_starts=[], seg_ends=[], seg_slots=[], token_slots=token_slots, seg_indptr=zero,
                     seg_slot_t=zero, num_rows=token_slots.shape[0], block_m=TILE_ROWS, tiles=tiles,
                     expand_block_m=TILE_ROWS, expand_tiles=tiles, static=True, tile_count=tile_count)


def _with_segments(batch: LoRABatch, slots: np.ndarray) -> LoRABatch:
    """The static ``batch`` with the host segment lists of its first ``len(slots)`` rows (runs of equal slot),
    for the per-segment terms of the eager embedding and head."""
    n = slots.shape[0]
    starts = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1]]) if n else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], n] if n else starts
    return dataclasses.replace(batch, seg_starts=starts.tolist(), seg_ends=ends.tolist(),
                               seg_slots=slots[starts].tolist())


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    out: torch.Tensor  # written by each replay: float32 logits (base graphs), hidden rows (adapter graphs)


# forward(input_ids, ctx, logits_indices or None) -> float32 logits of those rows (None: every row)
Forward = Callable[[torch.Tensor, ForwardContext, Optional[torch.Tensor]], torch.Tensor]


@dataclass
class ModelParts:
    """The step in three parts, for the adapter graphs, which hold only ``body``. Each runs under the context
    it is given."""

    embed: Callable[[torch.Tensor, ForwardContext], torch.Tensor]  # token ids -> input embeddings
    # (token ids, their embeddings, ctx, logits_indices or None) -> hidden states of those rows (None: every row)
    body: Callable[[torch.Tensor, torch.Tensor, ForwardContext, Optional[torch.Tensor]], torch.Tensor]
    head: Callable[[torch.Tensor, ForwardContext], torch.Tensor]  # hidden rows -> float32 logits


class StepGraphs:
    """The captured graphs of one model runner: decode graphs per batch size, mixed graphs per token count.

    ``forward`` runs the model; it is called eagerly to warm up (Triton compiles), then under capture.
    ``lora``: capture the adapter variants too, of ``parts.body`` (``embeds``: their persistent input,
    (tokens, hidden) in the model's dtype)."""

    def __init__(self, decode: StepInputs, mixed: Optional[StepInputs], forward: Forward, decode_sizes: list[int],
                 mixed_sizes: list[int], lora: bool, max_model_len: int, parts: Optional[ModelParts] = None,
                 embeds: Optional[torch.Tensor] = None) -> None:
        assert not lora or (parts is not None and embeds is not None), "adapter graphs need the model's parts"
        self.decode = decode
        self.mixed = mixed
        self.sizes = sorted(decode_sizes)
        self.mixed_sizes = sorted(mixed_sizes) if mixed is not None else []
        self.lora = lora
        self._forward = forward
        self._parts = parts
        self._embeds = embeds
        self._max_model_len = max_model_len
        self._graphs: dict[tuple[bool, int, bool], _Graph] = {}
        self.capture_seconds = 0.0
        self.memory_bytes = 0
        self.replays = 0  # graph steps run (tests, metrics)

    @staticmethod
    def _fit(sizes: list[int], n: int) -> Optional[int]:
        return next((s for s in sizes if s >= n), None)

    def size_for(self, batch: int) -> Optional[int]:
        """The decode graph size for ``batch`` sequences (None: larger than every capture)."""
        return self._fit(self.sizes, batch)

    def plan(self, seqs: Sequence) -> Optional[tuple[bool, int]]:
        """(decode family?, size) of the graph that runs ``seqs``, or None (eager)."""
        if not seqs or not is_graph_step(seqs, self.lora):
            return None
        tokens = sum(s.num_new_tokens for s in seqs)
        if tokens == len(seqs):
            n = self.size_for(tokens)
            if n is not None:
                return True, n
        if self.mixed is not None and len(seqs) <= self.mixed.rows:
            n = self._fit(self.mixed_sizes, tokens)
            if n is not None:
                return False, n
        return None

    def _captured(self, decode: bool, n: int, lora: bool, ctx: Optional[ForwardContext] = None) -> torch.Tensor:
        """What the graph of (decode, n, lora) records: the whole step (base), the decoder layers over the
        embeddings buffer (adapters)."""
        inputs = self.decode if decode else self.mixed
        ctx = ctx or inputs.context(n, lora, self._max_model_len)
        rows = None if decode else inputs.dev["logits_indices"]
        ids = inputs.dev["input_ids"][:n]
        if not lora:
            return self._forward(ids, ctx, rows)
        return self._parts.body(ids, self._embeds[:n], ctx, rows)

    def _embed(self, decode: bool, n: int, ctx: ForwardContext) -> None:
        inputs = self.decode if decode else self.mixed
        self._embeds[:n].copy_(self._parts.embed(inputs.dev["input_ids"][:n], ctx))

    def _run_forward(self, decode: bool, n: int, lora: bool) -> torch.Tensor:
        """The step a graph of (decode, n, lora) runs, eagerly (warm-up before capture)."""
        if not lora:
            return self._captured(decode, n, lora)
        ctx = (self.decode if decode else self.mixed).context(n, lora, self._max_model_len)
        self._embed(decode, n, ctx)
        return self._parts.head(self._captured(decode, n, lora, ctx), ctx)

    @torch.inference_mode()
    def capture(self) -> None:
        dev = self.decode.device_buf.device
        torch.cuda.synchronize(dev)
        free0 = torch.cuda.mem_get_info(dev)[0]
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        families = [(False, self.mixed_sizes), (True, self.sizes)] if self.mixed is not None else [(True, self.sizes)]
        # No garbage collection inside a capture: a collected object's finaliser (an engine dropped earlier in
        # the process, with its pinned buffers and events) may call into CUDA in ways a capture forbids, which
        # invalidates it ("operation failed due to a previous error during capture", seen on an H200). Collect
        # once now, then not until every graph is captured.
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._capture_all(dev, pool, families)
        finally:
            if was_enabled:
                gc.enable()
        torch.cuda.synchronize(dev)
        self.capture_seconds = time.perf_counter() - t0
        self.memory_bytes = max(0, free0 - torch.cuda.mem_get_info(dev)[0])
        logger.info("loraplex: captured %d CUDA graphs (decode batch sizes %s; mixed steps of %s tokens%s) in "
                    "%.1f s, %.0f MiB", len(self._graphs), self.sizes, self.mixed_sizes,
                    "; with and without adapters" if self.lora else "", self.capture_seconds,
                    self.memory_bytes / 2**20)

    def _capture_all(self, dev: torch.device, pool, families: list) -> None:
        # LORAPLEX_GRAPH_CUBLASLT_TOKENS (default 64): graphs of at most that many tokens captured with cuBLASLt's
        # GEMMs. On an H200 (8B) the layer's four GEMMs took 110 against 115 us at 32 rows, 137 against 133 at
        # 128; the decode step at batch 32 4.90 against 5.08 ms, with cuBLAS kept above 64 tokens
        lt_tokens = envs.LORAPLEX_GRAPH_CUBLASLT_TOKENS
        for lora in ((False, True) if self.lora else (False,)):
            for decode, sizes in families:
                for n in reversed(sizes):  # largest first: the smaller graphs reuse its pool memory
                    (self.decode if decode else self.mixed).pad(n)
                    with preferred_blas("cublaslt" if n <= lt_tokens else None):
                        for _ in range(2):  # compile every kernel and settle the allocator before capture
                            self._run_forward(decode, n, lora)
                        torch.cuda.synchronize(dev)
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                            out = self._captured(decode, n, lora)
                    self._graphs[(decode, n, lora)] = _Graph(g, out)

    def release(self) -> None:
        """Destroy every captured graph now (not when garbage collection gets to them)."""
        for g in self._graphs.values():
            g.graph.reset()
        self._graphs.clear()
        if self.decode.device_buf.is_cuda:
            torch.cuda.synchronize(self.decode.device_buf.device)

    def run(self, seqs: Sequence, fix_inputs: Optional[Callable[[torch.Tensor], None]] = None,
            planned: Optional[tuple[bool, int]] = None) -> torch.Tensor:
        """Fill the inputs of the step ``seqs`` and replay its graph: float32 logits (B, padded vocab) of each
        sequence's last token, a view of the graph's output valid until the next replay. ``fix_inputs(input_ids)``
        may then amend the token ids on the device (tokens sampled by a step still in flight). ``planned``:
        :meth:`plan` of ``seqs`` when the caller has it already."""
        planned = planned or self.plan(seqs)
        assert planned is not None, f"no graph for this step of {len(seqs)} sequences"
        decode, n = planned
        inputs = self.decode if decode else self.mixed
        lora = self.lora and any(s.slot >= 0 for s in seqs)
        inputs.fill(seqs, n)
        if fix_inputs is not None:
            fix_inputs(inputs.dev["input_ids"])
        g = self._graphs.get((decode, n, lora))  # None: not captured (CPU tests): what it records runs eagerly
        B = len(seqs)
        self.replays += 1
        if not lora:
            if g is None:
                return self._captured(decode, n, lora)[:B]
            g.graph.replay()
            return g.out[:B]
        ctx = inputs.context(n, lora, self._max_model_len)
        if any((a := getattr(s.req, "adapter", None)) is not None and (a.tokens or a.saved) for s in seqs):
            token_slots, seq_slots = inputs.last_slots  # per-segment terms of the embedding and head read these
            ctx = dataclasses.replace(ctx, lora=_with_segments(ctx.lora, token_slots),
                                      lora_logits=_with_segments(ctx.lora_logits, seq_slots))
        self._embed(decode, n, ctx)
        if g is None:
            hidden = self._captured(decode, n, lora, ctx)
        else:
            g.graph.replay()
            hidden = g.out
        return self._parts.head(hidden[:B], ctx)
