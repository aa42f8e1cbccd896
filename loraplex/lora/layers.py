"""LoRA wrappers: each stands in for its base layer everywhere.

A wrapper holds the layer as ``base_layer`` and forwards every attribute it does
not define to it, so model code, the weight loader, the sampler and the
multimodal embedding routine never need to know a layer is wrapped. It owns
stacked per-slot LoRA buffers (a :class:`LoRAStack`: ``max_loras`` slots,
``max_lora_rank`` columns, zero padded, with per-slot ranks and scales kept on
the host and mirrored on the device, both updated only in ``set_lora`` /
``reset_lora``) and adds ``scale * B(A(x))`` for rows whose slot holds weights;
rows of the base model (slot -1) get exactly the base output.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from loraplex.distributed.parallel_state import all_reduce
from loraplex.engine.context import current_lora_batch, defer_delta
from loraplex.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from loraplex.layers.linear import (ColumnParallelLinear, LinearBase, MergedColumnParallelLinear,
                                    QKVParallelLinear, ReplicatedLinear, RowParallelLinear)
from loraplex.lora.adapter import LoRAWeights
from loraplex.lora.backends.base import LoRABackend, LoRAStack, PageTable, upload


class BaseLayerWithLoRA(nn.Module):
    """Attribute forwarding and per-slot bookkeeping shared by every wrapper."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.backend: Optional[LoRABackend] = None
        self.num_slices = 1
        # Leave the LoRA delta of this layer's output, when the backend expanded it into a buffer beside the base
        # GEMM, to the kernel that reads the output next (the model's lora_delta_consumers; LoRAModel sets it).
        self.fold_delta = False
        self.active: frozenset[int] = frozenset()  # slots holding weights for this layer
        # DoRA: slot -> float32 scale of each output channel (magnitude / ||W + scaling * B A|| per channel, on
        # the device, computed when the adapter enters the slot); rows of that slot become
        # scale * (y - bias) + bias. LoRA bias: slot -> float32 scaling * bias of each output channel (0 for
        # slices without one), added to that slot's rows before any DoRA rescaling. A backend that fuses them
        # (the Triton kernels) keeps both in its stack (``LoRAStack.ext``: CUDA graphs hold them); otherwise
        # they live here and are applied per segment on eager steps only (cuda_graph.is_graph_step: the torch
        # backend has no adapter graphs).
        self.dora: dict[int, torch.Tensor] = {}
        self.lora_bias: dict[int, torch.Tensor] = {}
        # DoRA under tensor parallelism where the norm runs over a sharded dimension (row-parallel layers: the
        # input; the embedding: the vocabulary): slot -> (this rank's partial squared norms, magnitudes, LoRA
        # bias vector or None), until LoRAModel.finish_pending sums the partials over the ranks (one all-reduce at
        # the start of the next step, on every rank) and sets the slot's scales.
        self.dora_pending: dict[int, tuple] = {}
        # Trainable tokens (embedding and head wrappers): slot -> (token ids, their rows) on the device; the
        # embedding also keeps a map id -> row (-1: not replaced). Applied per segment: the embedding and the
        # head run outside the adapter graphs (cuda_graph.ModelParts), with the step's segment lists.
        self.tokens: dict[int, tuple] = {}
        # modules_to_save (embedding and head wrappers): slot -> the adapter's own table on the device, used
        # instead of the base one for that slot's rows; per segment, as trainable tokens.
        self.saved: dict[int, torch.Tensor] = {}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__["_modules"].get("base_layer")
            if base is None:
                raise
            return getattr(base, name)

    def _init_stack(self, backend: LoRABackend, stack: LoRAStack) -> None:
        self.backend = backend
        self.stack = stack
        self.fused_extras = stack.ext is not None
        self.max_rank = stack.max_rank
        # Per-slice views and host lists, shared with the stack (the torch backend and tests read them).
        # Padded layout only (the torch backend; empty when pages are smaller than max_rank):
        self.lora_a = stack.a_slices  # [slice] (slots, max_rank, in)
        self.lora_b = stack.b_slices  # [slice] (slots, n_slice, max_rank)
        self.ranks = stack.ranks  # [slice][slot]
        self.scales = stack.scales  # [slice][slot]

    def _set_extras(self, slot: int, bias: Optional[torch.Tensor], dora: Optional[torch.Tensor]) -> None:
        """``slot``'s LoRA bias and DoRA scale vectors (either None): into the stack when the backend fuses
        them, else kept for the eager per-segment pass."""
        if self.fused_extras:
            if bias is not None and getattr(self, "row_parallel", False) and self.base_layer.tp_rank > 0:
                # the expand kernel adds it to this rank's partial sums, before the all-reduce: rank 0's alone
                bias = torch.zeros_like(bias)
            self.stack.set_extras(slot, bias, dora)
            return
        if bias is not None:
            self.lora_bias[slot] = bias
        if dora is not None:
            self.dora[slot] = dora

    def _update_active(self, slot: int, has_weights: bool) -> None:
        # a plain attribute: nn.Module's __setattr__ costs a slot load microseconds per wrapper
        object.__setattr__(self, "active", self.active | {slot} if has_weights else self.active - {slot})
        if not has_weights:
            self.dora.pop(slot, None)
            self.lora_bias.pop(slot, None)
            self.dora_pending.pop(slot, None)
            self.tokens.pop(slot, None)
            self.saved.pop(slot, None)

    def set_saved(self, slot: int, table: Optional[torch.Tensor]) -> None:
        """The adapter in ``slot`` brings its own trained table (modules_to_save) [vocab, hidden], or None."""
        self.saved.pop(slot, None)
        if table is None:
            return
        w = self.base_layer.weight
        self.saved[slot] = upload(table, w).to(w.dtype)
        self._update_active(slot, True)

    @staticmethod
    def _segments(batch, *tables: dict):
        """(start, end, slot) of each segment whose slot has an entry in one of ``tables`` (the per-slot terms
        applied on the host's segment lists: the batches inside CUDA graphs carry no segments, those of the
        eager embedding and head around an adapter graph do)."""
        if not batch.seg_slots or not any(tables):
            return
        for start, end, slot in zip(batch.seg_starts, batch.seg_ends, batch.seg_slots):
            if any(slot in t for t in tables):
                yield start, end, slot

    def _apply_eager_terms(self, y: torch.Tensor, batch, bias: Optional[torch.Tensor]) -> None:
        """Per segment of a slot with them, in place: its LoRA bias ``y += scaling * lora_bias``, then DoRA's
        per-channel rescaling ``y = scale * (y - bias) + bias`` (``bias``: the base layer's; y already holds
        the base output and the LoRA delta)."""
        for start, end, slot in self._segments(batch, self.dora, self.lora_bias):
            extra, scale = self.lora_bias.get(slot), self.dora.get(slot)
            rows = y[start:end]
            out = rows.float()
            if extra is not None:
                out = out + extra
            if scale is not None:
                out = out * scale if bias is None else (out - bias) * scale + bias
            rows.copy_(out)

    # Subclasses implement create_lora_weights / set_lora / reset_lora / forward.


class LinearWithLoRA(BaseLayerWithLoRA):
    """LoRA on a linear layer whose output is ``num_slices`` concatenated parts
    (1 for plain projections, 3 for qkv, 2 for gate_up). Column-parallel layers
    shard B along the output; row-parallel layers shard A along the input."""

    def __init__(self, base_layer: LinearBase) -> None:
        super().__init__(base_layer)
        self.output_slices: tuple[int, ...] = tuple(base_layer.output_slices)
        self.num_slices = len(self.output_slices)
        self.row_parallel = isinstance(base_layer, RowParallelLinear)

    def create_lora_weights(self, max_loras: int, max_rank: int, backend: LoRABackend,
                            pages: Optional[PageTable] = None) -> None:
        w = self.base_layer.weight
        in_local = self.base_layer.input_size_per_partition
        self._init_stack(backend, LoRAStack.zeros(self.num_slices, max_loras, max_rank, max_rank, in_local,
                                                  self.output_slices, w.dtype, w.device, backend.fuses_extras,
                                                  pages))

    def reset_lora(self, slot: int) -> None:
        self.stack.clear(slot)
        self._update_active(slot, False)

    def shards(self, weights: Sequence[Optional[LoRAWeights]]):
        """(slice, its weights, this rank's A, this rank's B, start and rows of B's shard or None) of each slice
        with weights: row-parallel layers cut A along the input, column-parallel ones B along the output with the
        base weight's rule."""
        base = self.base_layer
        for i, lw in enumerate(weights):
            if lw is None:
                continue
            a, b, start, n = lw.A, lw.B, None, None  # (r, in), (out_slice_full, r)
            if self.row_parallel and base.tp_size > 1:
                k = base.input_size_per_partition
                a = a[:, base.tp_rank * k:(base.tp_rank + 1) * k]
            elif base.tp_size > 1 and base.tp_dim == 0:
                if hasattr(base, "shard_rows"):
                    start, n = base.shard_rows(i)
                else:
                    n = self.output_slices[i]
                    start = base.tp_rank * n
                b = b[start:start + n]
            yield i, lw, a, b, start, n

    def set_lora(self, slot: int, weights: Sequence[Optional[LoRAWeights]]) -> None:
        """Copy one adapter's weights (one entry per slice, None = not targeted) into ``slot``."""
        self.reset_lora(slot)
        base = self.base_layer
        dora_parts: list = []
        bias_parts: list = []
        for i, lw, a, b, start, n in self.shards(weights):
            self.stack.write_a(slot, i, a)
            self.stack.write_b(slot, sum(self.output_slices[:i]), b)
            self.stack.set(slot, i, lw.rank, float(lw.scaling))
            sharded = b.shape[0] != lw.B.shape[0]
            if lw.magnitude is not None:
                mag = lw.magnitude[start:start + n] if sharded else lw.magnitude
                dora_parts.append((i, a, b, lw.scaling, mag))
            if lw.bias is not None:
                bias_parts.append((i, lw.bias[start:start + n] if sharded else lw.bias, lw.scaling))
        self._update_active(slot, any(w is not None for w in weights))
        bias = self._bias_vector(bias_parts) if bias_parts else None
        if dora_parts and self.row_parallel and base.tp_size > 1:  # the norm sums over the sharded input
            sq, mag = self._dora_partial(dora_parts)
            self.dora_pending[slot] = (sq, mag, bias)
            self._set_extras(slot, bias, None)
        else:
            self._set_extras(slot, bias, self._dora_scale(dora_parts) if dora_parts else None)

    def _slice_rows(self, i: int, n: int) -> slice:
        """Rows of this rank's weight holding the first ``n`` outputs of slice ``i``."""
        first = sum(self.output_slices[:i])
        return slice(first, first + n)

    def _bias_vector(self, parts: list) -> torch.Tensor:
        """``scaling * bias`` of each output channel of this rank's weight (0 where a slice has none), float32;
        ``parts``: (slice, this rank's bias rows, scaling)."""
        w = self.base_layer.weight
        vec = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
        for i, b, scaling in parts:
            vec[self._slice_rows(i, b.shape[0])] = upload(b, w).float() * scaling
        return vec

    def _dora_scale(self, parts: list) -> torch.Tensor:
        """Per output channel of this rank's weight: magnitude / ||W + scaling * B A|| over the input (DoRA; 1 for
        slices without it), in float32. ``parts``: (slice, A, this rank's B, scaling, magnitude)."""
        sq, mag = self._dora_partial(parts, ranks=1)
        return mag / sq.sqrt()

    def _dora_partial(self, parts: list, ranks: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared norms of W + scaling * B A over this rank's input columns, magnitudes), per output channel of
        this rank's weight, float32; channels without DoRA get 1 / ``ranks`` and 1, so that once summed over the
        ``ranks`` ranks (default: the group's size) their scale is 1."""
        w = self.base_layer.weight
        ranks = ranks or self.base_layer.tp_size
        sq = torch.full((w.shape[0],), 1.0 / ranks, dtype=torch.float32, device=w.device)
        mags = torch.ones(w.shape[0], dtype=torch.float32, device=w.device)
        for i, a, b, scaling, mag in parts:
            rows = self._slice_rows(i, b.shape[0])
            a, b, mag = (upload(t, w).float() for t in (a, b, mag))
            sq[rows] = (w[rows].float() + scaling * (b @ a)).square().sum(dim=1)
            mags[rows] = mag
        return sq, mags

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = current_lora_batch()
        if batch is None or not batch.runs(self.active):
            return self.base_layer(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        bias = getattr(self.base_layer, "bias", None)
        shrunk = self.backend.start_shrink(x2, self.stack, batch)  # reads x only: may run beside the base GEMM
        if self.row_parallel and self.base_layer.tp_size > 1:
            return self._row_parallel_forward(x2, shrunk, batch).view(*lead, -1)
        y = self.base_layer(x)
        y2 = y.reshape(-1, y.shape[-1])  # (tokens, out)
        if self.fold_delta:
            pending = self.backend.expand_pending(y2, shrunk(), self.stack, batch, bias)
            if pending is not None:
                defer_delta(y2, pending)
        else:
            self.backend.expand(y2, shrunk(), self.stack, batch, bias)
        self._apply_eager_terms(y2, batch, bias)
        return y2.view(*lead, y.shape[-1])

    def _row_parallel_forward(self, x2: torch.Tensor, shrunk: Callable[[], torch.Tensor], batch) -> torch.Tensor:
        """A row-parallel layer under tensor parallelism: this rank's delta, from the ``xA`` of its input shard,
        goes into its partial output before the layer's all-reduce, which sums deltas and base outputs at once
        (one collective per layer, not a second one for ``xA``). The sum is linear, so each term may be split
        over the ranks: the expand kernel's DoRA scale (per output channel) applies to each partial, its LoRA
        bias is rank 0's alone (``_set_extras``); the base bias and the eager per-segment terms (the torch
        backend's LoRA bias and DoRA) follow the sum."""
        base = self.base_layer
        y2 = torch.nn.functional.linear(x2, base.weight)  # this rank's partial sums
        self.backend.expand(y2, shrunk(), self.stack, batch, None)
        y2 = all_reduce(y2)
        if base.bias is not None:
            y2 = y2 + base.bias
        self._apply_eager_terms(y2, batch, base.bias)
        return y2


class VocabEmbeddingWithLoRA(BaseLayerWithLoRA):
    """Embedding LoRA: ``E[ids] + scale * A.T[ids] @ B.T`` (PEFT's ``lora_embedding_A/B``).

    Under tensor parallelism A is sharded along the vocabulary with the base table: a rank holds the A rows
    of its shard plus one zero row, which ids outside the shard look up; it adds its delta to its part of
    the lookup before the embedding's all-reduce, which then carries the delta of the one rank holding
    each id."""

    def create_lora_weights(self, max_loras: int, max_rank: int, backend: LoRABackend,
                            pages: Optional[PageTable] = None) -> None:
        w = self.base_layer.weight
        base = self.base_layer
        rows = base.num_embeddings if base.tp_size == 1 else base.num_embeddings_per_partition + 1
        # A stored transposed, (1, pages, vocab rows, page rank), so that a lookup by token id is a row gather.
        self._init_stack(backend, LoRAStack.zeros(1, max_loras, max_rank, rows, max_rank,
                                                  (base.embedding_dim,), w.dtype, w.device, backend.fuses_extras,
                                                  pages))
        self.lora_a_t = self.stack.a[0]  # (pages, vocab, page rank): padded layout (slots, vocab, max_rank)
        self.lora_b = self.stack.b_slices[0] if self.stack.b_slices else None  # padded layout: (slots, hidden, rank)

    def reset_lora(self, slot: int) -> None:
        self.stack.clear(slot)
        self._update_active(slot, False)

    def set_lora(self, slot: int, weights: Sequence[Optional[LoRAWeights]]) -> None:
        self.reset_lora(slot)
        lw = weights[0]
        if lw is None:
            return
        r = lw.rank
        base = self.base_layer
        vocab = lw.A.shape[1]  # (r, vocab): rows beyond org_vocab_size (and the zero row) stay zero
        start, end = base.vocab_start_index, min(base.vocab_end_index, vocab)  # this rank's shard
        self.stack.write_a_t(slot, lw.A[:, start:max(start, end)].T)
        self.stack.write_b(slot, 0, lw.B)
        self.stack.set(slot, 0, r, float(lw.scaling))
        self._update_active(slot, True)
        if lw.magnitude is not None:  # one DoRA scale per hidden dim: the norm runs over the vocabulary
            rows = max(0, end - start)  # this rank's rows of the real vocabulary (all of them on one rank)
            w = base.weight[:rows]
            a, b, mag = (upload(t, w).float() for t in (lw.A[:, start:start + rows], lw.B, lw.magnitude))
            sq = (w.float() + lw.scaling * (a.T @ b.T)).square().sum(dim=0)
            if base.tp_size > 1:  # summed over the vocabulary shards at the start of the next step
                self.dora_pending[slot] = (sq, mag, None)
            else:
                self._set_extras(slot, None, mag / sq.sqrt())

    def set_tokens(self, slot: int, entry: Optional[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Trainable tokens of the adapter in ``slot``: rows ``entry[1]`` replace the table's rows of ids
        ``entry[0]`` for that slot's tokens (None: none)."""
        self.tokens.pop(slot, None)
        if entry is None:
            return
        w = self.base_layer.weight
        ids, rows = upload(entry[0], w), upload(entry[1], w).to(w.dtype)
        # over the whole vocabulary (under tensor parallelism the rows replace those of the all-reduced lookup)
        row_of = torch.full((self.base_layer.num_embeddings,), -1, dtype=torch.int64, device=w.device)
        row_of[ids] = torch.arange(ids.shape[0], device=w.device)
        self.tokens[slot] = (row_of, rows)
        self._update_active(slot, True)

    def _apply_tokens(self, y: torch.Tensor, ids: torch.Tensor, batch) -> None:
        """Rows of trainable tokens, in place, per segment of a slot that has them (no sync: a gather and a
        select; ids past the table, such as image placeholders, are never replaced)."""
        for start, end, slot in self._segments(batch, self.tokens):
            row_of, rows = self.tokens[slot]
            seg = ids[start:end]
            inside = seg < row_of.shape[0]
            r = torch.where(inside, row_of[seg.clamp(max=row_of.shape[0] - 1)], -1)
            y[start:end] = torch.where((r >= 0)[:, None], rows[r.clamp(min=0)].to(y.dtype), y[start:end])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        batch = current_lora_batch()
        if base.tp_size > 1:
            y = base.partial(ids)
            if batch is not None and batch.runs(self.active):
                local, mask = base.local_ids(ids)
                zero_row = self.lora_a_t.shape[1] - 1  # the row past this rank's shard (zero in every slot)
                self.backend.embed(y, torch.where(mask, local, torch.full_like(local, zero_row)), self.stack, batch)
            y = all_reduce(y)
            if batch is not None:  # DoRA (torch backend), trainable tokens, trained tables: on the reduced lookup
                self._apply_eager_terms(y, batch, None)
                self._apply_tokens(y, ids, batch)
                self._apply_saved(y, ids, batch)
            return y
        num = base.num_embeddings
        y = base(ids if not self.saved else ids.clamp(max=num - 1))  # added tokens: past the base table
        if batch is None or not batch.runs(self.active):
            return y
        self.backend.embed(y, ids.clamp(max=num - 1) if self.saved else ids, self.stack, batch)
        self._apply_eager_terms(y, batch, None)
        self._apply_tokens(y, ids, batch)
        self._apply_saved(y, ids, batch)
        return y

    def _apply_saved(self, y: torch.Tensor, ids: torch.Tensor, batch) -> None:
        """Rows of the trained tables (modules_to_save), in place, per segment of a slot that has one; ids past
        the adapter's table (image placeholders) keep the base rows."""
        for start, end, slot in self._segments(batch, self.saved):
            table = self.saved[slot]
            seg = ids[start:end]
            own = torch.nn.functional.embedding(seg.clamp(max=table.shape[0] - 1), table)
            y[start:end] = torch.where((seg < table.shape[0])[:, None], own, y[start:end])


class LMHeadWithLoRA(LinearWithLoRA):
    """LoRA on the output head, applied per logits row (``lora_logits`` batch):
    logits rows are a subset of tokens (last token of each sequence, or every
    prompt position when prompt logprobs are asked for)."""

    def __init__(self, base_layer: ParallelLMHead) -> None:
        BaseLayerWithLoRA.__init__(self, base_layer)
        self.output_slices = (base_layer.num_embeddings_per_partition,)
        self.num_slices = 1
        self.row_parallel = False

    def create_lora_weights(self, max_loras: int, max_rank: int, backend: LoRABackend,
                            pages: Optional[PageTable] = None) -> None:
        w = self.base_layer.weight
        self._init_stack(backend, LoRAStack.zeros(1, max_loras, max_rank, max_rank, self.base_layer.embedding_dim,
                                                  self.output_slices, w.dtype, w.device, backend.fuses_extras,
                                                  pages))

    def set_lora(self, slot: int, weights: Sequence[Optional[LoRAWeights]]) -> None:
        self.reset_lora(slot)
        lw = weights[0]
        if lw is None:
            return
        base = self.base_layer
        r = lw.rank
        b = lw.B  # (org_vocab, r): padded rows stay zero
        n = self.output_slices[0]
        start = base.tp_rank * n
        part = b[start:min(start + n, b.shape[0])]
        self.stack.write_a(slot, 0, lw.A)
        self.stack.write_b(slot, 0, part, width=n)  # padded vocabulary rows: zero
        self.stack.set(slot, 0, r, float(lw.scaling))
        self._update_active(slot, True)
        bias = dora = None
        if lw.bias is not None:
            bias = self._bias_vector([(0, lw.bias[start:start + part.shape[0]], lw.scaling)])
        if lw.magnitude is not None:  # padded vocabulary rows keep scale 1 (their logits are dropped)
            mag = lw.magnitude[start:start + part.shape[0]]
            dora = self._dora_scale([(0, lw.A, part, lw.scaling, mag)])
        self._set_extras(slot, bias, dora)

    def set_tokens(self, slot: int, entry: Optional[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Trainable tokens of the adapter in ``slot`` for the head: the logits of ids ``entry[0]`` come from
        rows ``entry[1]`` for that slot's rows (None: none). Under tensor parallelism a rank keeps the ids of
        its vocabulary shard, as columns of its logits."""
        self.tokens.pop(slot, None)
        if entry is None:
            return
        ids, rows = entry
        base = self.base_layer
        if base.tp_size > 1:
            keep = (ids >= base.vocab_start_index) & (ids < base.vocab_end_index)
            if not bool(keep.any()):
                return
            ids, rows = ids[keep] - base.vocab_start_index, rows[keep]
        w = base.weight
        self.tokens[slot] = (upload(ids, w), upload(rows, w).to(w.dtype))
        self._update_active(slot, True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from loraplex.distributed.parallel_state import all_gather_last_dim

        base = self.base_layer
        batch = current_lora_batch(for_logits=True)
        logits = torch.nn.functional.linear(hidden, base.weight)  # (rows, vocab shard)
        run = batch is not None and batch.runs(self.active)
        if run:
            buf = self.backend.shrink(hidden, self.stack, batch)
            self.backend.expand(logits, buf, self.stack, batch)
            self._apply_eager_terms(logits, batch, None)
            for start, end, slot in self._segments(batch, self.tokens):  # this shard's columns
                ids, rows = self.tokens[slot]
                logits[start:end].index_copy_(1, ids, hidden[start:end] @ rows.T)
        logits = all_gather_last_dim(logits)  # (rows, padded vocabulary): whole rows from here
        if run:  # trained tables, whole (under tensor parallelism every rank holds the table and the rows)
            saved = list(self._segments(batch, self.saved))
            widest = max((self.saved[slot].shape[0] for _, _, slot in saved), default=0)
            if widest > logits.shape[1]:  # added tokens: columns past the base head, -inf for other rows
                wide = logits.new_full((logits.shape[0], widest), float("-inf"))
                wide[:, :logits.shape[1]] = logits
                logits = wide
            for start, end, slot in saved:  # padded vocabulary columns past the table keep the base logits
                table = self.saved[slot]
                logits[start:end, :table.shape[0]] = hidden[start:end] @ table.T
        return logits


# Base layer class -> wrapper class. Order matters: the most specific class first.
WRAPPERS: list[tuple[type, type]] = [
    (ParallelLMHead, LMHeadWithLoRA),
    (VocabParallelEmbedding, VocabEmbeddingWithLoRA),
    (QKVParallelLinear, LinearWithLoRA),
    (MergedColumnParallelLinear, LinearWithLoRA),
    (ColumnParallelLinear, LinearWithLoRA),
    (RowParallelLinear, LinearWithLoRA),
    (ReplicatedLinear, LinearWithLoRA),
]


def wrapper_for(module: nn.Module) -> Optional[type]:
    for base_cls, wrapper_cls in WRAPPERS:
        if type(module) is base_cls:
            return wrapper_cls
    return None
