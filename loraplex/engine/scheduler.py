"""Continuous batching with paged KV blocks and adapter slots.

Each step: running requests decode one token each (their KV blocks grow as
needed; when blocks run out, the most recently admitted running request is
preempted: its blocks and adapter slot are freed and it goes back to the front
of the queue, to be recomputed from its prompt plus the tokens it already
produced). Then waiting requests are admitted in arrival order while the
sequence, token and block budgets allow and an adapter slot can be had; a
request whose adapter cannot get a slot is passed over for now, not failed.
Prefills and decodes share the batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

from loraplex.engine.kv_cache import BlockAllocator
from loraplex.engine.request import Request, Status
from loraplex.lora.pool import LoRAPool


@dataclass
class ScheduledSeq:
    req: Request
    num_new_tokens: int  # tokens to compute this step (prefill: the whole uncomputed tail)
    start: int  # index of the first new token in req.all_token_ids


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    preempted: list[Request]


class Scheduler:
    def __init__(self, allocator: BlockAllocator, pool: Optional[LoRAPool], max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        self.allocator = allocator
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
            self._free(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    # ---------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput([], [])
        budget = self.max_num_batched_tokens
        # 1. Decodes of running requests; preempt from the back when blocks run out.
        decodes: list[Request] = []
        queue = list(self.running)
        while queue:
            req = queue.pop(0)
            need = self.allocator.blocks_needed(req.num_tokens, len(req.block_table))
            while not self.allocator.can_allocate(need):
                victim = queue.pop() if queue else None
                if victim is None:
                    break
                self._preempt(victim, out)
            if not self.allocator.can_allocate(need):
                self._preempt(req, out)
                continue
            req.block_table.extend(self.allocator.allocate(need))
            decodes.append(req)
        self.running = decodes
        for req in decodes:
            n = req.num_tokens - req.num_computed_tokens
            out.seqs.append(ScheduledSeq(req, n, req.num_computed_tokens))
            budget -= n

        # 2. Admit waiting requests (FCFS, passing over those whose adapter has no slot).
        passed: list[Request] = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting.popleft()
            n = req.num_tokens
            need = self.allocator.blocks_needed(n)
            if n > budget or not self.allocator.can_allocate(need):
                self.waiting.appendleft(req)
                break
            slot = -1
            if req.adapter is not None:
                got = self.pool.acquire(req.adapter)
                if got is None:
                    passed.append(req)
                    continue
                slot = got
            req.slot = slot
            req.block_table = self.allocator.allocate(need)
            req.num_computed_tokens = 0
            req.status = Status.RUNNING
            self.running.append(req)
            out.seqs.append(ScheduledSeq(req, n, 0))
            budget -= n
        self.waiting.extendleft(reversed(passed))
        # Group sequences by adapter slot so LoRA segments are as long as possible.
        out.seqs.sort(key=lambda s: s.req.slot)
        return out

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self._free(req)
        req.status = Status.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def _free(self, req: Request) -> None:
        self.allocator.free(req.block_table)
        if req.slot >= 0 and self.pool is not None:
            self.pool.release(req.slot)
        req.slot = -1

    def finish(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        self._free(req)
        req.status = Status.FINISHED
