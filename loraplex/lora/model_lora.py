"""Wrap a model's LoRA-able layers and describe them to the adapter loader.

Every linear layer inside the decoder, the input embedding and the output head
are wrapped. Each wrapper is reachable under its loraplex module name and each
of its slices under the Hugging Face module name an adapter uses (q_proj, k_proj
and v_proj are the three slices of qkv_proj).
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from loraplex import envs
from loraplex.lora.adapter import AdapterTargetSpec, LoRAAdapter, ModuleTarget
from loraplex.lora.backends.base import LoRABackend, PageTable, SlotWriter
from loraplex.lora.layers import BaseLayerWithLoRA, LMHeadWithLoRA, VocabEmbeddingWithLoRA, wrapper_for
from loraplex.lora.packing import pack_adapter, unpack_adapter
from loraplex.lora.slot_plan import SlotPlan, build_plan


@dataclass
class WrappedModule:
    name: str  # loraplex module name, e.g. model.layers.0.self_attn.qkv_proj
    wrapper: BaseLayerWithLoRA
    slice_names: list[str]  # Hugging Face module names, one per output slice


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


_NO_BUFFER = torch.empty(0, dtype=torch.uint8)  # a slot writer's staged buffer when nothing is copied from one


class LoRAModel:
    """The wrapped layers of one model, and its :class:`AdapterTargetSpec`."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, backend: LoRABackend) -> None:
        self.model = model
        packed: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", {}))
        self.modules: list[WrappedModule] = []
        targets: dict[str, ModuleTarget] = {}
        candidates = [(n, m) for n, m in model.named_modules() if wrapper_for(m) is not None]
        device = next(model.parameters()).device
        page = getattr(backend, "page_rank", None)
        if page and page < max_rank:
            # Rank-aware slots: the memory of max_loras adapters of max_rank, in pages of `page` rank rows; an
            # adapter takes the pages of its own rank, so up to one slot per page (extras rows: max_loras).
            num_pages = max_loras * -(-max_rank // page)
            self.pages = PageTable(num_pages, num_pages, page, max_rank, max_loras, device)
        else:
            self.pages = PageTable.padded(max_loras, max_rank, device)
        self.fused_extras = bool(getattr(backend, "fuses_extras", False))
        # Adapter loads into paged slots as one batched launch (kernels/slot_write.py; the Triton backend's);
        # LORAPLEX_BATCHED_SLOT_WRITES=0 copies tensor by tensor instead.
        self.batched_writes = (getattr(backend, "name", "") == "triton"
                               and envs.LORAPLEX_BATCHED_SLOT_WRITES)
        self._reading: list = []  # (upload event, tensors its batched copies read until it completes)
        self._planned: dict[int, SlotPlan] = {}  # slot -> the plan that loaded its adapter
        # slot plans (lora/slot_plan.py) for the adapters they cover; LORAPLEX_SLOT_PLANS=0: set_lora for all
        self.slot_plans = self.batched_writes and envs.LORAPLEX_SLOT_PLANS
        self._set_by_wrappers: set[int] = set()  # slots holding an adapter that set_lora wrote (batched writes)
        # layers whose output goes straight into a fused norm or SiLU-and-mul, which fold their pending delta
        consumers = set(getattr(model, "lora_delta_consumers", ())) if getattr(backend, "fold_deltas", False) else set()
        for name, base in candidates:
            wrapper = wrapper_for(base)(base)
            wrapper.create_lora_weights(max_loras, max_rank, backend, self.pages)
            _set_submodule(model, name, wrapper)
            prefix, _, leaf = name.rpartition(".")
            wrapper.fold_delta = leaf in consumers
            subs = packed.get(leaf)
            if subs:
                slice_names = [f"{prefix}.{s}" if prefix else s for s in subs]
                sizes = list(getattr(base, "checkpoint_output_sizes", None) or getattr(base, "output_sizes"))
            else:
                slice_names = [name]
                sizes = [getattr(base, "output_size", None) or getattr(base, "org_vocab_size")]
            if isinstance(wrapper, VocabEmbeddingWithLoRA):
                targets[name] = ModuleTarget(name, "embedding", base.org_vocab_size, base.embedding_dim)
            else:
                in_features = getattr(base, "input_size", None) or base.embedding_dim
                for sn, out in zip(slice_names, sizes):
                    targets[sn] = ModuleTarget(sn, "linear", in_features, out)
            self.modules.append(WrappedModule(name, wrapper, slice_names))
        self._by_slice = {sn: (wm, i) for wm in self.modules for i, sn in enumerate(wm.slice_names)}
        # CUDA: the device buffer a batched slot load copies its staged adapter into before the copy kernel runs
        # (see SlotWriter): the kernel reading pinned host memory in place held SMs while PCIe answered, and on an
        # H200 (8B shape, 1,000 adapters) steps that started a load took 0.8 ms longer than the others at the
        # median against 0.06 ms with this buffer. Sized for one adapter of max_rank on every wrapped layer;
        # larger staged adapters (trainable tokens, saved tables) are read in place. Loads run one after another
        # on the upload stream, so one buffer serves them all. Under tensor parallelism only rank 0 reads staged
        # adapters from host memory (the others receive them on the device). LORAPLEX_SLOT_LOAD_STAGING=0: none.
        from loraplex.distributed.parallel_state import get_tp_rank

        self.staging: Optional[torch.Tensor] = None
        if (device.type == "cuda" and self.batched_writes and not self.pages.identity and self.modules
                and get_tp_rank() == 0 and envs.LORAPLEX_SLOT_LOAD_STAGING):
            self.staging = torch.empty(self.staging_bytes(), dtype=torch.uint8, device=device)
        config = getattr(model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.tied_embeddings = bool(getattr(text, "tie_word_embeddings", False))
        self.spec = AdapterTargetSpec(
            modules=targets,
            packed_modules_mapping=packed,
            num_layers=int(getattr(config, "num_hidden_layers", 0) or 0),
            vocab_size=int(getattr(config, "vocab_size", 0) or 0),
            base_weight=self._base_weight,
        )

    def staging_bytes(self) -> int:
        """An upper bound of the staged bytes of one adapter of ``max_rank`` on every wrapped layer, with LoRA
        bias and DoRA magnitudes (whole, as staged: this rank's stacks times the tensor-parallel size), and each
        tensor's alignment; trainable tokens and saved tables are not counted."""
        from loraplex.distributed.parallel_state import get_tp_size
        from loraplex.lora.packing import ALIGN

        total = 0
        for wm in self.modules:
            st = wm.wrapper.stack
            per_page = st.a[:, 0].numel() * st.a.element_size() + st.b[0].numel() * st.b.element_size()
            total += per_page * self.pages.max_pages + 8 * sum(st.slices) + 4 * ALIGN * len(st.slices)
        return total * get_tp_size() + ALIGN

    def _base_weight(self, hf_name: str) -> Optional[tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
        """This rank's part of a base weight, and the function that cuts the same part out of a full
        checkpoint-shaped tensor (identity on one rank); None: not a wrapped module."""
        hit = self._by_slice.get(hf_name)
        if hit is None:
            return None
        wm, i = hit
        base = wm.wrapper.base_layer
        w = base.weight.detach()
        if hasattr(base, "org_vocab_size"):  # vocabulary-parallel: rows [start, end) of the real vocabulary
            start = base.vocab_start_index
            end = max(start, min(base.vocab_end_index, base.org_vocab_size))
            return w[: end - start], lambda t: t[start:end]
        if getattr(base, "tp_size", 1) > 1 and len(wm.slice_names) == 1:
            return w, lambda t: base._shard(base.weight, t)
        return w, lambda t: t

    # Called with (slot, adapter or None) on every set_slot: rank 0 of tensor parallelism forwards it to the others
    observer: Optional[Callable[[int, Optional[LoRAAdapter]], None]] = None
    # Called before a slot is written; True when it changed the base weights on the current stream (the LoRA
    # merger restoring them: a DoRA adapter's scales are computed from them), so the copies wait for it.
    before_write: Optional[Callable[[], bool]] = None

    def _device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        a = self.modules[0].wrapper.stack.a if self.modules else torch.empty(0)
        return a.device, a.dtype

    def stage(self, adapter: LoRAAdapter) -> None:
        """Keep ``adapter``'s weights in one buffer (:func:`~loraplex.lora.packing.pack_adapter`; its tensors
        become views of it), on CUDA in pinned host memory and in the slots' dtype, so that copying it into a
        slot neither converts on the host nor waits for the device, and one pinned allocation serves the whole
        adapter (tensor parallelism also sends that buffer as it is). In place; once per adapter."""
        if adapter.packed is not None:
            return
        device, dtype = self._device_and_dtype()
        source = adapter
        if device.type == "cuda":  # the slots' dtype (DoRA magnitudes, biases and token ids stay as they are)
            source = dataclasses.replace(
                adapter, modules={k: dataclasses.replace(w, A=w.A.to(dtype), B=w.B.to(dtype))
                                  for k, w in adapter.modules.items()},
                tokens={k: (ids, rows.to(dtype)) for k, (ids, rows) in adapter.tokens.items()},
                saved={k: t.to(dtype) for k, t in adapter.saved.items()})
        meta, flat = pack_adapter(source, pin=device.type == "cuda")
        views = unpack_adapter(meta, flat, own_small=False)
        adapter.modules, adapter.tokens, adapter.saved = views.modules, views.tokens, views.saved
        adapter.packed = (meta, flat)
        if self.batched_writes and not self.pages.identity:  # here, off the engine thread when the pool reads
            self.plan(adapter)

    def set_slot(self, slot: int, adapter: Optional[LoRAAdapter],
                 after: Optional[Sequence[torch.cuda.Event]] = None) -> Optional[torch.cuda.Event]:
        """Copy ``adapter``'s weights into ``slot`` of every wrapper (None clears it).

        CUDA: the copies run on a side stream (item 8 of issue 9) alongside later steps, which must not use the
        slot until the returned event has completed (the pool's readiness check; ranks > 0 of tensor
        parallelism make their stream wait for it). They start after ``after``, the events of the last steps
        that read the memory they overwrite (the slot's and that of slots evicted for its pages; the pool keeps
        them), or, when ``after`` is None, after every step queued so far. The host never waits. CPU: the
        copies are done on return (None)."""
        if self.observer is not None:
            self.observer(slot, adapter)
        if self.before_write is not None and self.before_write():
            after = None
        device, _ = self._device_and_dtype()
        if device.type != "cuda":
            self._write_slot(slot, adapter)
            return None
        if self._upload_stream is None:
            self._upload_stream = torch.cuda.Stream(device)
        stream = self._upload_stream
        if after is None:
            stream.wait_stream(torch.cuda.current_stream(device))
        else:  # only the steps that read this memory: a slot unused for a while loads at once
            for ev in after:
                stream.wait_event(ev)
        with torch.cuda.stream(stream):
            keep = self._write_slot(slot, adapter)
        done = torch.cuda.Event()
        done.record(stream)
        self._reading = [(ev, k) for ev, k in self._reading if not ev.query()]
        if keep:  # the batched copies read these (the staged adapter in place): alive until they have run
            self._reading.append((done, keep))
        return done

    _upload_stream: Optional[torch.cuda.Stream] = None
    _dora_pending = False  # whether a slot write left DoRA partials for finish_pending

    def finish_pending(self) -> None:
        """Complete the DoRA scales that need a sum over tensor-parallel ranks (``dora_pending`` of the wrappers):
        one all-reduce of every pending partial, then each slot's scales. Called by every rank at the start of
        each step (ModelRunner.before_step): ranks replay the same slot changes in the same order, so their
        pending lists match. CUDA: after the side stream's copies, without the host waiting."""
        if not self._dora_pending:  # the common case: one attribute read a step
            return
        self._dora_pending = False
        jobs = [(wm.wrapper, slot) for wm in self.modules for slot in sorted(wm.wrapper.dora_pending)]
        if not jobs:
            return
        from loraplex.distributed.parallel_state import all_reduce

        if self._upload_stream is not None:
            torch.cuda.current_stream(self._upload_stream.device).wait_stream(self._upload_stream)
        parts = [w.dora_pending.pop(slot) for w, slot in jobs]
        total = all_reduce(torch.cat([sq for sq, _, _ in parts]))
        offset = 0
        for (w, slot), (sq, mag, bias) in zip(jobs, parts):
            n = sq.shape[0]
            w._set_extras(slot, bias, mag / total[offset:offset + n].sqrt())
            offset += n

    @property
    def num_slots(self) -> int:
        return self.pages.num_slots

    def fits(self, adapter: LoRAAdapter, freed: Sequence[int] = ()) -> bool:
        """Whether ``adapter`` fits in the slots' memory once the slots ``freed`` are emptied."""
        return self.pages.fits(adapter.max_rank, self._needs_ext(adapter), freed)

    def _needs_ext(self, adapter: LoRAAdapter) -> bool:
        return self.fused_extras and (adapter.has_dora or adapter.has_lora_bias)

    def _write_slot(self, slot: int, adapter: Optional[LoRAAdapter]) -> list[torch.Tensor]:
        """Write ``slot`` (on the current stream); returns the tensors that copies still queued read. A staged
        adapter going into paged slots of the Triton backend is copied by one batched launch
        (:class:`SlotWriter`, ``kernels/slot_write.py``) rather than two copies per tensor, and every word a load
        or a clear changes (ranks, scales, page-table entries, extras rows) by one more. An adapter with a
        :class:`~loraplex.lora.slot_plan.SlotPlan` loads (and later clears) by replaying it, without walking
        the wrappers; the others through each wrapper's ``set_lora``."""
        device, _ = self._device_and_dtype()
        if not self.batched_writes or self.pages.identity:
            if adapter is None:
                self.pages.release(slot)
            else:
                self.pages.assign(slot, adapter.max_rank, self._needs_ext(adapter))
            self._write_modules(slot, adapter)
            return []
        # clears too: their rank and scale zeros, like a load's page-table entries, go as words of one launch
        # (a scalar fill each cost a clear of an 8B-shaped slot some 200 launches of host time)
        flat = adapter.packed[1] if adapter is not None and adapter.packed is not None else _NO_BUFFER
        writer = self.pages.writer = SlotWriter(flat, device, self.staging)
        try:
            plan = self.plan(adapter) if adapter is not None else None
            if adapter is None:
                self.pages.release(slot)
            else:
                self.pages.assign(slot, adapter.max_rank, self._needs_ext(adapter))
            old = self._planned.pop(slot, None)  # the plan that loaded what the slot holds
            if old is not None:
                old.undo(slot)
                writer.add_plan(old, slot, load=False)
            elif slot in self._set_by_wrappers and (adapter is None or plan is not None):
                self._write_modules(slot, None)
            self._set_by_wrappers.discard(slot)
            if plan is not None:
                plan.apply(slot)
                writer.add_plan(plan, slot, load=True)
                self._planned[slot] = plan
            elif adapter is not None:
                self._write_modules(slot, adapter)
                self._set_by_wrappers.add(slot)
            return writer.run(self.pages.table, slot * self.pages.max_pages)
        finally:
            self.pages.writer = None

    def plan(self, adapter: LoRAAdapter) -> Optional[SlotPlan]:
        """``adapter``'s slot plan for this model, built on first use and kept with the adapter (None: it loads
        through the wrappers; see ``lora/slot_plan.py``)."""
        if not self.slot_plans:
            return None
        cached = adapter.slot_plan
        if cached is None or cached[0] is not self:
            cached = adapter.slot_plan = (self, build_plan(self, adapter))
        return cached[1]

    def warm_up(self) -> None:
        """Compile the batched slot-write kernels now (CUDA start-up), not at the first adapter load."""
        if self.batched_writes and not self.pages.identity and self.modules:
            from loraplex.kernels.slot_write import warm_up

            device, dtype = self._device_and_dtype()
            warm_up(torch.empty(0, dtype=dtype).element_size(), device)

    def _write_modules(self, slot: int, adapter: Optional[LoRAAdapter]) -> None:
        with torch.no_grad():
            for wm in self.modules:
                weights = [adapter.modules.get(n) for n in wm.slice_names] if adapter else [None] * len(wm.slice_names)
                if any(w is not None for w in weights):
                    with wm.wrapper.stack.writing(slot):
                        wm.wrapper.set_lora(slot, weights)
                elif slot in wm.wrapper.active:  # a wrapper without weights in the slot has nothing to clear
                    with wm.wrapper.stack.writing(slot):
                        wm.wrapper.reset_lora(slot)
                if isinstance(wm.wrapper, (VocabEmbeddingWithLoRA, LMHeadWithLoRA)):
                    wm.wrapper.set_tokens(slot, self._tokens_for(wm, adapter))
                    wm.wrapper.set_saved(slot, adapter.saved.get(wm.slice_names[0]) if adapter else None)
        if adapter is not None and adapter.has_dora:  # its sharded norms may wait for finish_pending
            self._dora_pending = True

    def _tokens_for(self, wm: WrappedModule, adapter: Optional[LoRAAdapter]):
        """The trainable tokens of ``adapter`` for this table: its own entry, or for the head of a model with
        tied embeddings the input embedding's (PEFT ties them), or None."""
        if adapter is None or not adapter.tokens:
            return None
        name = wm.slice_names[0]
        entry = adapter.tokens.get(name)
        if entry is None and isinstance(wm.wrapper, LMHeadWithLoRA) and self.tied_embeddings:
            entry = next((v for n, v in adapter.tokens.items() if self.spec.modules[n].kind == "embedding"), None)
        return entry
