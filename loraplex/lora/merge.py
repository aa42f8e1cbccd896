"""One adapter merged into the base weights, for steps in which every request uses it.

    W <- W0 + sum_i scale_i * B_i A_i   (slice i of each linear layer: rows of that slice; W0 kept aside)

A step whose every row uses the same adapter then runs as a base-model step (its graphs, no LoRA kernel), so
it costs what the base model costs; any other step first restores ``W0``. The copy of every linear layer's
weight that this keeps (``W0``) is the price: about the size of the decoder layers' weights. Adapters that
touch more than the linear layers' weights are not merged: LoRA on the embedding or the head, trainable
tokens or modules_to_save (the embedding and head run outside the merged weights), DoRA (its per-channel
scale depends on the merged weight's norm) and LoRA bias.

The engine asks before each step (:meth:`LoRAMerger.before_step`, ``enable_lora_merging``): a merge waits for
:data:`MERGE_AFTER_STEPS` steps in a row on one mergeable adapter, so that a mix that changes every step does
not pay for a merge each time. Merges and restores are device work queued on the current stream, between
the steps that read the weights.
"""

from __future__ import annotations

from typing import Optional

import torch

from loraplex.lora.layers import LinearWithLoRA
from loraplex.lora.model_lora import LoRAModel

# Steps in a row whose rows all use one mergeable adapter before it is merged. A merge reads and writes every
# linear weight once, a restore copies them: each about 28 GB of traffic on the Llama-3-8B shape. On an H200
# (2026-12-01) a restore took 7.1 ms, about 1.5 decode steps at batch 32, and a merge 48 ms, bound by its host
# reading the pages with a host-list index per slice (since made views), while merging saves 0.6 ms a step. A merge that is restored before it has run that many steps doubles the
# wait for the next one (up to MAX_MERGE_AFTER_STEPS), and one that runs four times as long halves it again:
# a mix that changes often stops paying for merges it cannot use.
MERGE_AFTER_STEPS = 8
MAX_MERGE_AFTER_STEPS = 256


class LoRAMerger:
    """Merges one slot's adapter into the linear layers' weights and restores them (module docstring)."""

    def __init__(self, lora_model: LoRAModel) -> None:
        self.lora_model = lora_model
        self.linears = [wm for wm in lora_model.modules if isinstance(wm.wrapper, LinearWithLoRA)]
        # W0: each linear layer's base weight as loaded (this rank's shard)
        self.originals = [wm.wrapper.base_layer.weight.detach().clone() for wm in self.linears]
        self.merged: Optional[int] = None  # the slot whose adapter the weights hold (None: W0)
        self._touched: list[int] = []  # indices into self.linears whose weight differs from W0
        self.num_merges = 0
        self.num_restores = 0
        self.after_steps = MERGE_AFTER_STEPS  # the streak the next merge waits for (see MERGE_AFTER_STEPS)
        self.merged_steps = 0  # steps run on the current merge
        self._streak = (-1, 0)  # (slot, steps in a row whose every sequence used it)
        self._mergeable: dict[int, bool] = {}  # slot -> mergeable, until the next slot write
        lora_model.before_write = self.restore_for_write

    @property
    def merged_slot(self) -> int:
        """:attr:`merged` as a slot index (-1: none), as step plans and sequences carry slots."""
        return -1 if self.merged is None else self.merged

    @property
    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.originals)

    def blocker(self, slot: int) -> Optional[str]:
        """Why ``slot``'s adapter cannot be merged (the first module that stops it), or None when it can."""
        for wm in self.lora_model.modules:
            w = wm.wrapper
            holds = slot in w.active or slot in w.tokens or slot in w.saved
            if not holds:
                continue
            if not isinstance(w, LinearWithLoRA):
                return f"{wm.name}: LoRA, trainable tokens or a saved table on a layer that is not linear"
            extras = w.fused_extras and w.stack.pages.has_ext(slot)
            if extras or slot in w.dora or slot in w.lora_bias or slot in w.dora_pending:
                return f"{wm.name}: DoRA or LoRA bias"
        return None

    def before_step(self, slot: int, loading: bool) -> bool:
        """The policy, before each step: ``slot`` is the adapter slot every sequence of the step uses (-1: they
        do not share one), ``loading`` whether its upload may still be in flight. Restores ``W0`` unless the step
        is all on the merged adapter; merges ``slot`` once it has run :attr:`after_steps` steps in a row (and can
        be merged). True when the step runs merged: its sequences then read no adapter."""
        last, run = self._streak
        run = (run + 1 if last == slot else 1) if slot >= 0 else 0
        self._streak = (slot, run)
        if self.merged is not None and self.merged != slot:
            self.restore()
        if (self.merged is None and slot >= 0 and run >= self.after_steps and not loading and self.mergeable(slot)
                and not self.dora_pending()):
            self.merge(slot)
        if self.merged is None:
            return False
        self.merged_steps += 1
        return True

    def dora_pending(self) -> bool:
        """Whether a DoRA adapter's scales are still to be summed over the ranks (tensor parallelism: at the
        start of the next step, from the base weights): no merge until they are."""
        return any(wm.wrapper.dora_pending for wm in self.lora_model.modules)

    def mergeable(self, slot: int) -> bool:
        """:meth:`blocker` is None, remembered until the next slot write."""
        if slot not in self._mergeable:
            self._mergeable[slot] = self.blocker(slot) is None
        return self._mergeable[slot]

    def _slices(self, index: int, slot: int):
        """(row offset, rows, B (rows, rank), A (rank, in), scale) of each slice of linear layer ``index`` that
        ``slot`` has weights for, read from the layer's stack in whatever page layout it has. The slot's pages
        are a view when they run consecutively (the padded layout always), else gathered once for the layer
        through the page table's device index: no index uploaded from a host list and no gather per slice (an H200
        merged the 8B shape's 129 linear modules in 48 ms that way, where a pass over their weights takes 7)."""
        w = self.linears[index].wrapper
        if slot not in w.active:
            return
        stack = w.stack
        pages = stack.pages.pages_of(slot)
        if not pages:
            return
        if pages == list(range(pages[0], pages[0] + len(pages))):
            a_pages, b_pages = stack.a[:, pages[0]:pages[0] + len(pages)], stack.b[pages[0]:pages[0] + len(pages)]
        else:
            where = stack.pages.index(slot)
            a_pages, b_pages = stack.a.index_select(1, where), stack.b.index_select(0, where)
        offset = 0
        for i, n in enumerate(stack.slices):
            rank, scale = stack.ranks[i][slot], stack.scales[i][slot]
            if rank:
                a = a_pages[i].reshape(-1, stack.a.shape[-1])[:rank]  # (rank, in)
                b = b_pages[:, offset:offset + n].permute(1, 0, 2).reshape(n, -1)[:, :rank]  # (n, rank)
                yield offset, n, b, a, scale
            offset += n

    @torch.no_grad()
    def merge(self, slot: int) -> None:
        """Make every linear weight ``W0 + sum_i scale_i B_i A_i`` of ``slot``'s adapter, starting from ``W0``
        (nothing drifts over many merges)."""
        if not self.mergeable(slot):
            raise ValueError(f"slot {slot}'s adapter cannot be merged: {self.blocker(slot)}")
        self.restore()
        for index, wm in enumerate(self.linears):
            weight = wm.wrapper.base_layer.weight
            touched = False
            for offset, n, b, a, scale in self._slices(index, slot):
                weight[offset:offset + n].addmm_(b, a, alpha=scale)  # one rounding, as W0 + scale * B A
                touched = True
            if touched:
                self._touched.append(index)
        self.merged = slot
        self.num_merges += 1

    def restore_for_write(self) -> bool:
        """Restore before a slot is written (``LoRAModel.before_write``): True when the weights were merged."""
        self._mergeable.clear()
        if self.merged is None:
            return False
        self.restore()
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """Every linear weight back to ``W0``, bit for bit."""
        if self.merged is not None:
            self.num_restores += 1
            if self.merged_steps < self.after_steps:  # restored before it paid for itself
                self.after_steps = min(2 * self.after_steps, MAX_MERGE_AFTER_STEPS)
            elif self.merged_steps >= 4 * self.after_steps:
                self.after_steps = max(self.after_steps // 2, MERGE_AFTER_STEPS)
            self.merged_steps = 0
        for index in self._touched:
            self.linears[index].wrapper.base_layer.weight.copy_(self.originals[index])
        self._touched = []
        self.merged = None
