"""What loading one adapter into a slot writes, worked out once per adapter and replayed by every later load.

A load into paged slots (the Triton backend's) copies each targeted wrapper's A and B, page by page, from the
adapter's staged buffer, and sets that wrapper's ranks and scales at the slot. None of it depends on which slot
or pages the adapter goes to: the copy kernel reads the slot's pages from the page table
(``kernels/slot_write.py``), and a rank or scale word sits at a fixed distance from slot 0's. A
:class:`SlotPlan` keeps all of it: the copy descriptors (pinned on CUDA, where the kernel reads them in place),
the rank and scale words at slot 0, and the host entries the wrappers keep. :func:`build_plan` walks the
adapter's tensors once (an all-linear adapter of the Llama-3-8B shape records thousands of pieces), and
``LoRAModel.stage`` calls it on the thread that reads the adapter. A slot load on the engine thread then costs
some list updates, one array operation and two launches, and a clear as little, whatever the adapter's size.

Plans cover adapters whose every target is a plain linear wrapper and that carry no extras: no DoRA, LoRA bias,
trainable tokens, saved tables, nor embedding or lm_head LoRA. The rest load through the wrappers' ``set_lora``,
which writes the same slots (``tests/test_kernels.py`` compares both ways bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from loraplex.lora.backends.base import SlotWriter, float_bits
from loraplex.lora.layers import LinearWithLoRA

if TYPE_CHECKING:
    from loraplex.lora.adapter import LoRAAdapter


@dataclass
class SlotPlan:
    """One adapter's slot load, independent of the slot (see the module docstring)."""

    entries: list[tuple[LinearWithLoRA, tuple[tuple[int, int, float], ...]]]  # wrapper, (slice, rank, scale)...
    pieces: dict[int, torch.Tensor]  # element size -> (pieces, PIECE_FIELDS) int64 copy descriptors
    word_addr: np.ndarray  # (words,) int64: the address of each rank and scale word at slot 0
    word_bits: np.ndarray  # (words,) int64: its value's 32 bits

    def words_at(self, slot: int, load: bool) -> np.ndarray:
        """(words, 2) int64 (address, bits): the rank and scale words at ``slot``, their values for a load, zeros
        for a clear."""
        bits = self.word_bits if load else np.zeros_like(self.word_bits)
        return np.stack([self.word_addr + slot * 4, bits], axis=1)

    def apply(self, slot: int) -> None:
        """The wrappers' host entries of ``slot`` <- the adapter's (its device words go through a SlotWriter)."""
        for wrapper, entries in self.entries:
            for i, rank, scale in entries:
                wrapper.stack.written(slot, i, rank, scale)
            wrapper._update_active(slot, True)

    def undo(self, slot: int) -> None:
        """The wrappers' host entries of ``slot`` <- empty (a clear)."""
        for wrapper, entries in self.entries:
            for i, _, _ in entries:
                wrapper.stack.written(slot, i, 0, 0.0)
            wrapper._update_active(slot, False)


def build_plan(lora_model: Any, adapter: "LoRAAdapter") -> Optional[SlotPlan]:
    """``adapter``'s :class:`SlotPlan` for ``lora_model`` (paged slots, batched writes, the adapter staged), or
    None when it needs the wrappers' own ``set_lora`` (see the module docstring). Reads only what never changes
    after start-up (the wrappers and their stacks' addresses), so it may run off the engine thread."""
    pages = lora_model.pages
    if (adapter.packed is None or pages.identity or adapter.tokens or adapter.saved or adapter.has_dora
            or adapter.has_lora_bias):
        return None
    n = pages.pages_needed(adapter.max_rank)
    recorder = SlotWriter(adapter.packed[1], torch.device("cpu"))
    entries: list = []
    addr: list[int] = []
    bits: list[int] = []
    for wm in lora_model.modules:
        weights = [adapter.modules.get(name) for name in wm.slice_names]
        if all(w is None for w in weights):
            continue
        wrapper = wm.wrapper
        if type(wrapper) is not LinearWithLoRA:
            return None
        st = wrapper.stack
        done = []
        for i, lw, a, b, _, _ in wrapper.shards(weights):
            if a.dim() != 2 or b.dim() != 2 or a.dtype != st.a.dtype or b.dtype != st.b.dtype:
                return None
            off_a, off_b = recorder.offset(a), recorder.offset(b)
            if off_a is None or off_b is None:
                return None
            st.record_a(recorder, off_a, n, i, a)
            st.record_b(recorder, off_b, n, sum(wrapper.output_slices[:i]), b, b.shape[0])
            scale = float(lw.scaling)
            done.append((i, lw.rank, scale))
            addr += [st.word_addr(st.ranks_t, i, 0), st.word_addr(st.scales_t, i, 0)]
            bits += [int(lw.rank), float_bits(scale)]
        entries.append((wrapper, tuple(done)))
    pin = lora_model._device_and_dtype()[0].type == "cuda"
    pieces = {size: desc.pin_memory() if pin else desc for size, desc in recorder.descriptors()}
    return SlotPlan(entries, pieces, np.array(addr, dtype=np.int64), np.array(bits, dtype=np.int64))
