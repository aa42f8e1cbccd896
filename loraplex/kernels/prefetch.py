"""L2 prefetch: a weight's bytes brought into the L2 cache on a side stream, ahead of the GEMM that reads it.

In a small decode batch some kernels of a layer are bound by latency, not bandwidth: at batch 32 of the
Llama-3-8B shape the rotary, attention and reduce kernels take about 18 us a layer and read 25 MB (half the
card's copy rate), and o_proj's GEMM after them read its 32 MiB weight in 11.6 us from HBM against 7.6 us from
L2 (H200, 2026-12-01). :class:`L2Prefetcher` lets the idle bandwidth fetch the next GEMM's weight meanwhile.

Two ways (``LORAPLEX_L2_PREFETCH``):

* ``bulk``: each lane of each program asks the copy engine of its SM to prefetch ``CHUNK`` bytes into L2
  (``cp.async.bulk.prefetch.L2``, sm_90 and later): no data reaches a register;
* ``load``: each program loads its share of the bytes (``evict_last``) and XORs them into one word of a sink,
  which keeps the loads from being removed.

A prefetch reads and never writes the weight, so where it runs changes no result. Under the Triton
interpreter (CPU tests) ``bulk`` runs as ``load``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from loraplex.kernels.common import INTERPRET, Launcher, num_sms

BULK_CHUNK = 8192  # bytes a lane asks for at once (a multiple of 16): 32 MiB is 128 programs
BULK_LANES = 32  # lanes (one warp) a program
LOAD_BLOCK = 2048  # int32 words a program loads an iteration


@triton.jit
def _prefetch_bulk_kernel(ptr, nbytes, CHUNK: tl.constexpr, LANES: tl.constexpr):
    lane = tl.program_id(0) * LANES + tl.arange(0, LANES)
    start = lane.to(tl.int64) * CHUNK
    size = tl.minimum(nbytes - start, CHUNK)
    size = tl.where(size > 0, size, 0).to(tl.int32)
    addr = (ptr + tl.where(size > 0, start, 0)).to(tl.int64)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
        "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_load_kernel(ptr, sink_ptr, n, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), tl.int32)
    for i in range(ITERS):
        offs = (pid * ITERS + i).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(ptr + offs, mask=offs < n, other=0, eviction_policy="evict_last")
    tl.store(sink_ptr + pid, tl.xor_sum(acc, 0))


_launch_bulk = Launcher(_prefetch_bulk_kernel)
_launch_load = Launcher(_prefetch_load_kernel)


def prefetch_l2(t: torch.Tensor, mode: str = "bulk", sink: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Ask the L2 for ``t``'s bytes (contiguous; a multiple of 16 bytes) on the current stream. ``load`` XORs
    each program's words into ``sink`` (int32, one word a program: :func:`sink_size` words fit any tensor; made
    when None) and returns it."""
    if not t.is_contiguous():
        raise ValueError(f"prefetch_l2 needs a contiguous tensor, got strides {t.stride()}")
    nbytes = t.numel() * t.element_size()
    if nbytes % 16:
        raise ValueError(f"prefetch_l2 needs a multiple of 16 bytes, got {nbytes}")
    if nbytes == 0:
        return sink
    if mode == "bulk" and not INTERPRET:
        lanes = triton.cdiv(nbytes, BULK_CHUNK)
        _launch_bulk((triton.cdiv(lanes, BULK_LANES),), (t.view(torch.uint8).view(-1), nbytes),
                     dict(CHUNK=BULK_CHUNK, LANES=BULK_LANES), num_warps=1)
        return sink
    if mode not in ("bulk", "load"):
        raise ValueError(f"prefetch mode must be 'bulk' or 'load', got {mode!r}")
    words = t.view(-1).view(torch.int32)
    programs = min(triton.cdiv(words.numel(), LOAD_BLOCK), sink_size(t.device))
    iters = triton.cdiv(words.numel(), programs * LOAD_BLOCK)
    if sink is None or sink.numel() < programs:
        sink = torch.empty(programs, dtype=torch.int32, device=t.device)
    _launch_load((programs,), (words, sink, words.numel()), dict(ITERS=iters, BLOCK=LOAD_BLOCK), num_warps=8)
    return sink


def sink_size(device: torch.device) -> int:
    """Programs of a ``load`` prefetch at most: four an SM."""
    return 4 * num_sms(device)


class L2Prefetcher:
    """Prefetches on a side stream forked from the current one (:meth:`start`), joined back once (:meth:`join`,
    at the end of the model's forward, which a CUDA graph's capture requires). Only steps of at most
    ``max_tokens`` tokens prefetch: larger GEMMs are not bound by their weight's bytes."""

    def __init__(self, mode: str, max_tokens: int) -> None:
        if mode not in ("bulk", "load"):
            raise ValueError(f"prefetch mode must be 'bulk' or 'load', got {mode!r}")
        self.mode = mode
        self.max_tokens = max_tokens
        self._side: dict[torch.device, torch.cuda.Stream] = {}
        self._sink: dict[torch.device, torch.Tensor] = {}
        self._forked: set[torch.device] = set()

    def start(self, weight: torch.Tensor, tokens: int) -> None:
        if tokens > self.max_tokens or not weight.is_cuda:
            return
        dev = weight.device
        main = torch.cuda.current_stream(dev)
        side = self._side.get(dev)
        if side is None:
            side = self._side[dev] = torch.cuda.Stream(dev)
        sink = self._sink.get(dev)
        if sink is None and self.mode == "load":  # made once, on the current stream, before the fork
            sink = self._sink[dev] = torch.empty(sink_size(dev), dtype=torch.int32, device=dev)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            prefetch_l2(weight, self.mode, sink)
        self._forked.add(dev)

    def join(self, device: torch.device) -> None:
        if device in self._forked:
            torch.cuda.current_stream(device).wait_stream(self._side[device])
            self._forked.discard(device)
