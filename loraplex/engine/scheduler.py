"""Continuous batching with paged KV blocks and adapter slots.

Each step: running requests decode one token each (their KV blocks grow as
needed; when blocks run out, the most recently admitted running request is
preempted: its blocks and adapter slot are freed and it goes back to the front
of the queue, to be recomputed from its prompt plus the tokens it already
produced). Then waiting requests are admitted in arrival order while the
sequence, token and block budgets allow and an adapter slot can be had; a
request whose adapter cannot get a slot is passed over for now, not failed, and once it has been passed
over for ``STARVATION_ROUNDS`` rounds, the few slots whose memory frees soonest for its adapter stop taking
new requests until they drain and it gets one (the other slots keep admitting).
Prefills and decodes share the batch.

With chunked prefill the step's token budget is filled decodes first, then
prompt chunks: first the chunk of the partially prefilled request (it stays
ahead of every new one, FCFS), then new requests, the last of which may get
only the first chunk of its prompt. A chunk never splits an image's
placeholder block: a block cut by the budget moves the chunk's end before it,
and a block that starts the chunk goes whole, even past the budget. Without
chunked prefill a prompt is admitted only when it fits the step whole.

With prefix caching a request being admitted first takes the longest run of committed blocks that match
its leading tokens, adapter and images (``kv_cache.block_hash``), and its first chunk starts after them;
each step commits the blocks running requests have filled, and a request that leaves (finished, aborted,
preempted) commits what it computed before releasing its blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

from loraplex.engine.kv_cache import BlockAllocator, block_hash
from loraplex.engine.request import Request, Status
from loraplex.lora.pool import LoRAPool


# Rounds a request may be passed over for want of an adapter slot before the slots busy with other adapters
# stop taking new requests (they drain, and it gets one): no adapter starves behind a steady stream of others.
STARVATION_ROUNDS = 64


@dataclass
class ScheduledSeq:
    req: Request
    num_new_tokens: int  # tokens to compute this step (a decode: 1; a prefill: a chunk of the uncomputed tail)
    start: int  # index of the first new token in req.all_token_ids
    # the request's adapter is merged into the base weights for this step (engine, enable_lora_merging): the
    # forward sees no adapter (slot -1); the slot stays the request's for the pool's bookkeeping
    merged: bool = False

    @property
    def slot(self) -> int:
        """The adapter slot the forward reads for this sequence (-1: none, the base weights as they are)."""
        return -1 if self.merged else self.req.slot

    @property
    def samples(self) -> bool:
        """Whether the step computes the request's last token so far, and so samples its next one (a chunk
        that ends inside the prompt samples nothing). Read it before the sampled token is appended."""
        return self.start + self.num_new_tokens == self.req.num_tokens

    @property
    def prompt_logprobs(self) -> bool:
        """Whether every new token needs a logits row: the step holds prompt positions of a request that
        asked for prompt logprobs and does not have them yet."""
        return self.req.wants_prompt_logprobs and self.start < len(self.req.prompt_token_ids)


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    preempted: list[Request]


class Scheduler:
    def __init__(self, allocator: BlockAllocator, pool: Optional[LoRAPool], max_num_seqs: int,
                 max_num_batched_tokens: int, chunked_prefill: bool = False,
                 long_prefill_token_threshold: int = 0) -> None:
        self.allocator = allocator
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.long_prefill_token_threshold = long_prefill_token_threshold  # 0: a chunk may take the whole budget
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._drain: Optional[tuple[int, set[int]]] = None  # (starving adapter's uid, the slots draining for it)

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
    # ---- prefix caching -----------------------------------------------------------------------------------
    def _block_hashes(self, req: Request, n: int) -> list[bytes]:
        """Hashes of ``req``'s first ``n`` full blocks of known tokens, chained (each covers its tokens, every
        earlier block, the adapter's content and the pixels of images placed in it). Computed once per block:
        a request's tokens only grow, so the chain stays valid across waits, preemptions and re-admissions."""
        hashes = req.block_hashes
        if len(hashes) < n:
            bs = self.allocator.block_size
            identity = req.adapter.content_hash if req.adapter is not None else None
            first = len(hashes)
            tokens = req.token_ids_at(first * bs, (n - first) * bs)
            for i in range(first, n):
                extra = b""
                if req.mm is not None:  # the pixels behind the placeholders of this block
                    extra = "".join(img.digest for img in req.mm.images
                                    if img.offset < (i + 1) * bs and img.offset + img.length > i * bs).encode()
                j = (i - first) * bs
                hashes.append(block_hash(hashes[-1] if hashes else None, tokens[j:j + bs], identity, extra))
        return hashes[:n]

    def _commit(self, req: Request) -> None:
        """Commit ``req``'s blocks that have become full, computed and of known tokens since the last call."""
        if not self.allocator.enable_caching:
            return
        bs = self.allocator.block_size
        known = len(req.prompt_token_ids) + len(req.output_token_ids)  # pending tokens are not known yet
        full = min(req.num_computed_tokens, known, len(req.block_table) * bs) // bs
        if req.num_committed_blocks >= full:
            return
        hashes = self._block_hashes(req, full)
        for i in range(req.num_committed_blocks, full):
            self.allocator.commit(req.block_table[i], hashes[i])
        req.num_committed_blocks = full

    def _reuse_prefix(self, req: Request) -> None:
        """A request being admitted starts from the longest committed prefix of its tokens (at least its last
        token is computed, for its logits); requests asking for prompt logprobs compute every position."""
        if not self.allocator.enable_caching or req.wants_prompt_logprobs:
            return
        bs = self.allocator.block_size
        known = len(req.prompt_token_ids) + len(req.output_token_ids)
        n_full = min(req.num_tokens - 1, known) // bs
        if n_full <= 0:
            return
        hits = self.allocator.lookup(self._block_hashes(req, n_full))
        if req.mm is not None:  # never start inside an image's placeholders: its step needs the whole image
            end, cut = len(hits) * bs, True
            while cut:  # moving the end back may land it inside an earlier image
                cut = False
                for img in req.mm.images:
                    if img.offset < end < img.offset + img.length:
                        end, cut = img.offset // bs * bs, True
            if end < len(hits) * bs:
                self.allocator.free(hits[end // bs:])
                hits = hits[:end // bs]
        req.block_table = hits
        req.num_committed_blocks = len(hits)
        req.num_computed_tokens = len(hits) * bs

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput([], [])
        budget = self.max_num_batched_tokens
        for req in self.running:
            self._commit(req)
        # 1. Decodes of running requests; preempt from the back when blocks run out (partially prefilled
        #    requests, set aside for step 2, are preempted after the later decodes).
        decodes: list[Request] = []
        prefilling: list[Request] = []
        queue = list(self.running)
        while queue:
            req = queue.pop(0)
            if req.num_pending and len(req.output_token_ids) + req.num_pending >= req.max_tokens:
                continue  # its pending token is its last (async scheduling): it finishes when read back
            if req.num_tokens - req.num_computed_tokens > 1:  # only with chunked prefill
                prefilling.append(req)
                continue
            need = self.allocator.blocks_needed(req.num_tokens, len(req.block_table))
            while not self.allocator.can_allocate(need):
                victim = queue.pop() if queue else prefilling.pop() if prefilling else None
                if victim is None:
                    break
                self._preempt(victim, out)
            if not self.allocator.can_allocate(need):
                self._preempt(req, out)
                continue
            req.block_table.extend(self.allocator.allocate(need))
            decodes.append(req)
        self.running = [r for r in self.running if r.status is Status.RUNNING]  # admission order
        for req in decodes:
            n = req.num_tokens - req.num_computed_tokens
            out.seqs.append(ScheduledSeq(req, n, req.num_computed_tokens))
            budget -= n

        # 2. The next chunk of each partially prefilled request; until its prompt is done no new one starts.
        blocked = False
        for req in prefilling:
            n = self._take_chunk(req, budget)
            if n:
                out.seqs.append(ScheduledSeq(req, n, req.num_computed_tokens))
                budget -= n
            blocked = blocked or req.num_computed_tokens + n < req.num_tokens

        # 3. Admit waiting requests (FCFS, passing over those whose adapter has no slot). Once a request has
        #    been passed over for STARVATION_ROUNDS rounds, the slots that free its adapter's memory soonest
        #    (pool.drain_set) take no new requests until it has one; every other slot goes on admitting.
        passed: list[Request] = []
        draining = self._draining()
        while self.waiting and len(self.running) < self.max_num_seqs and not blocked:
            req = self.waiting.popleft()
            if draining and req.adapter is not None and self.pool.slot_of(req.adapter) in draining:
                passed.append(req)  # would keep a slot busy that a starving adapter waits for
                continue
            self._reuse_prefix(req)  # cached prefix blocks, held from here on (released below if not admitted)
            start = req.num_computed_tokens
            if self.chunked_prefill:
                n = self._chunk_len(req, budget)
            else:
                n = req.num_tokens - start if req.num_tokens - start <= budget else 0
            need = self.allocator.blocks_needed(start + n, len(req.block_table))
            slot = -1
            if n and self.allocator.can_allocate(need) and req.adapter is not None:
                got = self.pool.acquire(req.adapter)
                if got is None:
                    self._release_prefix(req)
                    req.slot_waits += 1
                    passed.append(req)
                    continue
                slot = got
            if n == 0 or not self.allocator.can_allocate(need):
                self._release_prefix(req)
                self.waiting.appendleft(req)
                break
            req.slot = slot
            req.block_table.extend(self.allocator.allocate(need))
            if self.allocator.enable_caching and not req.wants_prompt_logprobs:  # metrics: prompt tokens looked up, found
                self.allocator.queried_tokens += req.num_tokens
                self.allocator.hit_tokens += start
            req.status = Status.RUNNING
            self.running.append(req)
            out.seqs.append(ScheduledSeq(req, n, start))
            budget -= n
            blocked = start + n < req.num_tokens
        self.waiting.extendleft(reversed(passed))
        # Group sequences by adapter slot so LoRA segments are as long as possible.
        out.seqs.sort(key=lambda s: s.req.slot)
        return out

    def _draining(self) -> set[int]:
        """The slots draining for the longest-starved adapter (the oldest waiting request passed over for
        STARVATION_ROUNDS rounds); kept while that adapter still waits, so the set does not wander."""
        if self.pool is None:
            return set()
        self.pool.new_round()
        self.pool.poll()
        starving = next((r.adapter for r in self.waiting
                         if r.adapter is not None and r.slot_waits >= STARVATION_ROUNDS), None)
        if starving is None or self.pool.slot_of(starving) is not None:
            self._drain = None
            return set()
        if self._drain is None or self._drain[0] != starving.uid:
            self._drain = (starving.uid, self.pool.drain_set(starving))
        return self._drain[1]

    def _chunk_len(self, req: Request, budget: int) -> int:
        """Tokens of the next prefill chunk of ``req``: at most ``budget``, and no more than the free KV blocks
        (plus those it holds) can take, and no more than ``long_prefill_token_threshold`` when set; an image
        block is never split (see the module docstring). 0: none fits."""
        if self.long_prefill_token_threshold:
            budget = min(budget, self.long_prefill_token_threshold)
        start = req.num_computed_tokens
        room = (len(req.block_table) + self.allocator.num_free) * self.allocator.block_size
        end = min(req.num_tokens, start + budget, room)
        if end <= start:
            return 0
        if req.mm is not None:
            for img in sorted(req.mm.images, key=lambda im: im.offset):
                first, last = img.offset, img.offset + img.length
                if first < end < last:
                    end = first if first > start else last
        return end - start if end <= room else 0

    def _take_chunk(self, req: Request, budget: int) -> int:
        """Size the next chunk of running ``req`` and allocate its KV blocks; returns its length (0: it waits)."""
        n = self._chunk_len(req, budget)
        if n:
            need = self.allocator.blocks_needed(req.num_computed_tokens + n, len(req.block_table))
            req.block_table.extend(self.allocator.allocate(need))
        return n

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self._free(req)
        req.status = Status.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def _release_prefix(self, req: Request) -> None:
        """Undo :meth:`_reuse_prefix` for a request that stays waiting."""
        self.allocator.free(req.block_table)
        req.block_table = []
        req.num_committed_blocks = 0
        req.num_computed_tokens = 0

    def _free(self, req: Request) -> None:
        self._commit(req)  # what it computed stays reusable after it leaves
        req.num_committed_blocks = 0
        self.allocator.free(req.block_table)
        if req.slot >= 0 and self.pool is not None:
            self.pool.release(req.slot)
        req.slot = -1

    def finish(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        self._free(req)
        req.status = Status.FINISHED
