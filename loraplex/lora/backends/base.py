"""LoRA backend interface and registry.

A backend computes the batched LoRA delta in two steps (punica's split):

    shrink: buf[t, i, :r] = x[t] @ A_i[slot(t)][:r].T          for every slice i
    expand: y[t, off_i:off_i+n_i] += buf[t, i, :r] @ B_i[slot(t)][:, :r].T * scale_i[slot(t)]

with ``r = ranks[i][slot]`` (0: the slot has no weights for slice i); rows
whose slot is -1 (the base model) or has rank 0 everywhere are left untouched.
Row-parallel layers all-reduce ``buf`` between the two steps, so ``buf`` is
opaque to the wrapper: each backend defines its layout (it must be linear in
the rows' contributions).
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import torch

from loraplex.backend_registry import load_backend, resolve_auto
from loraplex.lora.batch import LoRABatch


class PageTable:
    """Where each adapter slot's rank rows live in the stacks; one table is shared by every wrapper of a model.

    The stacks hold rank rows in *pages* of ``page_rank`` rows: slot ``s``'s rank row ``r`` is row
    ``r % page_rank`` of page ``table[s, r // page_rank]``. With ``page_rank == max_rank`` and the identity
    table (page ``s`` for slot ``s``) that is the padded layout, one ``max_rank`` block per slot (the torch
    backend, whose matmuls view each slot's block). With smaller pages (the Triton backend) an adapter takes
    only the pages its rank needs (rank-aware device memory: a rank-8 adapter takes one page of 8 where the
    padded layout gives it 64 rows), so more slots than ``max_loras`` share the same memory.

    ``ext_rows`` (slots,) maps a slot to its row of the stacks' per-slot extras (LoRA bias, DoRA scale), -1
    when its adapter has none (the kernels then skip them); there are ``num_ext_rows`` rows (padded layout: row
    ``s`` for slot ``s``). Assignments change only in :meth:`assign` / :meth:`release` (adapter loads), never in
    a forward; the device mirrors are written on the caller's stream.
    """

    def __init__(self, num_slots: int, num_pages: int, page_rank: int, max_rank: int, num_ext_rows: int,
                 device: torch.device) -> None:
        self.page_rank = page_rank
        self.max_rank = max_rank
        self.max_pages = -(-max_rank // page_rank)
        self.num_slots = num_slots
        self.num_pages = num_pages
        self.num_ext_rows = num_ext_rows
        self.identity = page_rank >= max_rank
        assert not self.identity or num_pages == num_slots == num_ext_rows, "the padded layout: a page per slot"
        host = torch.zeros(num_slots, self.max_pages, dtype=torch.int32)
        if self.identity:
            host[:, 0] = torch.arange(num_slots, dtype=torch.int32)
        self.table = host.to(device)  # (slots, max_pages) int32: the kernels' page of each rank block
        self.ext_rows = torch.full((num_slots,), -1, dtype=torch.int32).to(device)
        self._pages: dict[int, list[int]] = {s: [s] for s in range(num_slots)} if self.identity else {}
        self._index: dict[int, torch.Tensor] = {}  # slot -> its pages as a device int64 tensor (weight writes)
        self._free = [] if self.identity else list(range(num_pages))
        self._ext: dict[int, int] = {}
        self._free_ext = [] if self.identity else list(range(num_ext_rows))
        self.writer: Optional["SlotWriter"] = None  # while an adapter load batches its copies (LoRAModel)

    @classmethod
    def padded(cls, num_slots: int, max_rank: int, device: torch.device) -> "PageTable":
        return cls(num_slots, num_slots, max_rank, max_rank, num_slots, device)

    def pages_needed(self, rank: int) -> int:
        return 1 if self.identity else max(1, -(-rank // self.page_rank))

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_of(self, slot: int) -> list[int]:
        return self._pages.get(slot, [])

    def ext_row(self, slot: int) -> Optional[int]:
        """The extras row ``slot`` writes (padded layout: its own, whether used or not)."""
        return slot if self.identity else self._ext.get(slot)

    def has_ext(self, slot: int) -> bool:
        """Whether ``slot``'s adapter has extras (a LoRA bias or DoRA scales) in its row."""
        return slot in self._ext

    def assign(self, slot: int, rank: int, ext: bool) -> None:
        """Give ``slot`` the pages of ``rank`` rank rows (lowest free first) and an extras row when ``ext``, after
        releasing what it held. The caller made sure they are free (:meth:`fits`)."""
        self.release(slot)
        if self.identity:
            if ext:
                self._ext[slot] = slot
                self.ext_rows[slot].fill_(slot)
            return
        n = self.pages_needed(rank)
        assert n <= len(self._free) and (not ext or self._free_ext), "not enough free pages / extras rows"
        pages, self._free = self._free[:n], self._free[n:]
        self._pages[slot] = pages
        for j in range(self.max_pages):  # words of the load's writer (its one launch), else scalar fills
            self._set_word(self.table, slot * self.max_pages + j, pages[j] if j < n else 0)
        self._index.pop(slot, None)  # made when first asked for (the per-tensor writes)
        if ext:
            self._ext[slot] = self._free_ext.pop(0)
            self._set_word(self.ext_rows, slot, self._ext[slot])

    def release(self, slot: int) -> None:
        """Return ``slot``'s pages and extras row (its table entries keep pointing at them: nothing reads a slot
        without weights)."""
        row = self._ext.pop(slot, None)
        if row is not None:
            self._set_word(self.ext_rows, slot, -1)
        if self.identity:
            return
        self._free = sorted(self._free + self._pages.pop(slot, []))
        self._index.pop(slot, None)
        if row is not None:
            self._free_ext = sorted(self._free_ext + [row])

    def fits(self, rank: int, ext: bool, freed: Sequence[int] = ()) -> bool:
        """Whether an adapter of ``rank`` (with extras when ``ext``) fits once the slots ``freed`` are released."""
        if self.identity:
            return True
        pages = len(self._free) + sum(len(self._pages.get(s, ())) for s in freed)
        rows = len(self._free_ext) + sum(s in self._ext for s in freed)
        return pages >= self.pages_needed(rank) and (not ext or rows >= 1)

    def index(self, slot: int) -> torch.Tensor:
        """``slot``'s pages, a device int64 tensor (index_copy_ targets)."""
        if self.identity:
            raise AssertionError("the padded layout writes slots directly")
        index = self._index.get(slot)
        if index is None:
            index = self._index[slot] = upload(torch.tensor(self._pages[slot], dtype=torch.int64), self.table)
        return index

    def _set_word(self, t: torch.Tensor, i: int, value: int) -> None:
        """Element ``i`` of the int32 device tensor ``t`` (contiguous) <- ``value``: a word of the slot writer's
        launch while a load batches its writes, else a scalar fill."""
        if self.writer is not None:
            self.writer.word(t.data_ptr() + i * 4, value, False)
        else:
            t.view(-1)[i].fill_(value)


def float_bits(value: float) -> int:
    """``value`` as float32, its 32 bits read as a signed int (a word of a slot write)."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


class SlotWriter:
    """The copies of one adapter load, batched: while a writer is set on the model's :class:`PageTable`, the
    stacks record each page of A and B whose source is a view of the adapter's staged buffer ``flat``, and
    each changed rank, scale and table entry, instead of copying; :meth:`run` then does them all in two
    launches (``kernels/slot_write.py``). A piece names its page by its index in the slot (the kernel reads
    the page from the table), so what an adapter records does not depend on the slot it goes to: a
    :class:`~loraplex.lora.slot_plan.SlotPlan` keeps it, and later loads add it whole (:meth:`add_plan`).
    Sources that are not views of ``flat`` (or not of the stack's dtype) are copied at once, as without a
    writer.

    ``staging``: a device buffer (uint8) that ``flat`` is first copied into whole when it fits, by one
    asynchronous copy (the copy engine), so that the copy kernel reads device memory; else the kernel reads the
    pinned ``flat`` in place over PCIe, holding SMs that the steps running beside it need for as long."""

    def __init__(self, flat: torch.Tensor, device: torch.device, staging: Optional[torch.Tensor] = None) -> None:
        self.flat = flat  # uint8, the staged adapter (pinned host memory on CUDA)
        self.device = device
        self.staging = staging
        self.pieces: dict[int, list[int]] = {}  # element size -> rows of kernels.slot_write.PIECE_FIELDS, flat
        self.words: list[tuple[int, int]] = []  # (address, 32 bits as a signed int)
        self.plans: list[tuple[Any, int, bool]] = []  # (SlotPlan, slot, load: else clear)

    def offset(self, t: torch.Tensor) -> Optional[int]:
        """``t``'s offset in elements of its dtype within ``flat``, or None when ``t`` is not a view of it."""
        if t.device != self.flat.device or t.untyped_storage().data_ptr() != self.flat.untyped_storage().data_ptr():
            return None
        delta = t.data_ptr() - self.flat.data_ptr()
        if delta < 0 or delta % t.element_size() or self.flat.numel() % t.element_size():
            return None
        return delta // t.element_size()

    def piece(self, size: int, dst: int, page: int, page_bytes: int, offset: int, src_rs: int, src_cs: int,
              rows_valid: int, cols_valid: int, rows: int, cols: int, dst_rs: int) -> None:
        """The ``rows`` x ``cols`` block of ``size``-byte elements at address ``dst + table[slot, page] *
        page_bytes`` (row stride ``dst_rs``, contiguous columns) <- the staged elements at ``offset + r * src_rs +
        c * src_cs`` where r < rows_valid and c < cols_valid, zero elsewhere. Plain ints: a load of an all-linear
        rank-64 adapter of the Llama-3-8B shape records 3,584 of them."""
        flat = self.pieces.get(size)
        if flat is None:
            flat = self.pieces[size] = []
        flat += (dst, page, page_bytes, offset, src_rs, src_cs, rows_valid if rows_valid > 0 else 0,
                 cols_valid if cols_valid > 0 else 0, rows, cols, dst_rs)

    def word(self, dst: int, value: float, is_float: bool) -> None:
        """The 32-bit element at address ``dst`` <- ``value`` (float32 when ``is_float``, else int32)."""
        bits = float_bits(value) if is_float else int(value)
        self.words.append((dst, bits))

    def descriptors(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(element size, its recorded pieces as a (pieces, PIECE_FIELDS) int64 host tensor), per size."""
        from loraplex.kernels.slot_write import PIECE_FIELDS

        for size, flat in self.pieces.items():
            yield size, torch.tensor(flat, dtype=torch.int64).view(-1, PIECE_FIELDS)

    def add_plan(self, plan: Any, slot: int, load: bool) -> None:
        """Write ``plan``'s ranks and scales at ``slot`` (and, for a load, copy its pieces), or zero them (a
        clear)."""
        self.plans.append((plan, slot, load))

    def run(self, table: torch.Tensor, row: int) -> list[torch.Tensor]:
        """Launch the recorded writes on the current stream, the words first, then the copies into the pages
        ``table[row + page index]``; returns what they read, to be kept alive until they have run."""
        import numpy as np

        from loraplex.kernels.slot_write import as_words, copy_pieces, write_words

        keep: list[torch.Tensor] = []
        words = [np.array(self.words, dtype=np.int64).reshape(-1, 2)] if self.words else []
        for plan, slot, load in self.plans:
            words.append(plan.words_at(slot, load))
        if words:
            both = np.concatenate(words)
            # one value per address, the last recorded (a clear's zero, then a load's rank): the kernel's stores
            # to one address from several lanes land in no set order
            _, last = np.unique(both[::-1, 0], return_index=True)
            both = both[len(both) - 1 - last]
            keep += write_words(torch.from_numpy(both[:, 0].copy()), torch.from_numpy(both[:, 1].copy()), self.device)
        src = self.flat
        # a buffer in host memory (a device one, as tensor parallelism's ranks receive, is read where it is)
        copies = bool(self.pieces) or any(load for _, _, load in self.plans)
        if (copies and self.staging is not None and src.device.type == "cpu"
                and 0 < src.numel() <= self.staging.numel()):
            src = self.staging[:src.numel()]
            src.copy_(self.flat, non_blocking=True)  # the same stream as the kernels: they read it after
            keep.append(self.flat)
        for size, desc in self.descriptors():
            keep += copy_pieces(as_words(src, size), desc, self.device, table, row)
        for plan, slot, load in self.plans:
            if load:
                for size, desc in plan.pieces.items():
                    keep += copy_pieces(as_words(src, size), desc, self.device, table, row)
        self.pieces, self.words, self.plans = {}, [], []
        return keep


@dataclass
class LoRAStack:
    """The stacked per-slot weights of one wrapper, as every backend reads them, in pages of rank rows
    (:class:`PageTable`, ``pages``; P = ``pages.page_rank``).

    Linear layers: ``a`` (slices, pages, P, in); embeddings: ``a`` (1, pages, vocab, P), A transposed so that a
    lookup by token id is a row gather. ``b`` (pages, sum(slices), P): B with the slices side by side along
    dim 1. In the padded layout (P = max_rank, a page per slot: the torch backend) each slice's view
    ``b_slices[i][slot]`` has the layout of PEFT's ``lora_B.weight``, so the torch backend's matmuls round as
    PEFT's do; ``a_slices[i]`` / ``b_slices[i]`` are then views of slice i: (slots, max_rank, in) / (slots, n_i,
    max_rank). Weights go in through :meth:`write_a` / :meth:`write_b` / :meth:`write_a_t`, whatever the layout.
    Host ``ranks`` / ``scales`` ``[slice][slot]`` serve the torch backend; their device mirrors
    ``ranks_t`` (slices, slots) int32 and ``scales_t`` (slices, slots) float32 serve the kernels. All of
    them change only in :meth:`set` / :meth:`clear` (adapter loads), never in a forward.
    ``ext`` (backends that fuse them, see ``LoRABackend.fuses_extras``; else None): per extras row (the slot's
    is ``pages.ext_rows[slot]``), ``scaling * lora_B.bias`` (row 0, 0 where none) and DoRA's per-channel scale
    (row 1, 1 where none) over every output column, (rows, 2, sum(slices)) float32.
    """

    a: torch.Tensor
    b: torch.Tensor
    slices: tuple[int, ...]
    pages: PageTable
    max_rank: int
    ext: Optional[torch.Tensor] = None
    a_slices: list[torch.Tensor] = field(init=False)
    b_slices: list[torch.Tensor] = field(init=False)
    ranks: list[list[int]] = field(init=False)
    scales: list[list[float]] = field(init=False)
    ranks_t: torch.Tensor = field(init=False)
    scales_t: torch.Tensor = field(init=False)
    slice_meta: torch.Tensor = field(init=False)  # (slices, 2) int32: offset, width of each slice in y
    aligned: bool = field(init=False)  # every slice's offset and width a multiple of 8 (the kernels' vector access)
    _on_device: list[list[tuple[int, float]]] = field(init=False)  # (rank, scale) [slice][slot] ranks_t/scales_t hold
    _held: int = field(init=False, default=0)  # writes inside writing(): the device mirrors wait for its end

    @classmethod
    def zeros(cls, num_slices: int, max_loras: int, max_rank: int, a_rows: int, a_cols: int,
              slices: Sequence[int], dtype: torch.dtype, device: torch.device, extras: bool = False,
              pages: Optional[PageTable] = None) -> "LoRAStack":
        """All-zero stack. Linear (``a_rows == max_rank``): ``a`` (num_slices, pages, P, a_cols); embedding
        (``a_cols == max_rank``): ``a`` (1, pages, a_rows, P); ``b`` (pages, sum(slices), P). ``pages``: the model's
        shared table (default: the padded layout of ``max_loras`` slots); ``extras``: with the per-slot LoRA bias
        and DoRA rows (no slot has them yet)."""
        pages = pages or PageTable.padded(max_loras, max_rank, device)
        P, n = pages.page_rank, pages.num_pages
        if a_cols == max_rank and a_rows != max_rank:  # embedding: A transposed, rank last
            a = torch.zeros(num_slices, n, a_rows, P, dtype=dtype, device=device)
        else:
            a = torch.zeros(num_slices, n, P, a_cols, dtype=dtype, device=device)
        b = torch.zeros(n, sum(slices), P, dtype=dtype, device=device)
        ext = None
        if extras:
            ext = torch.zeros(pages.num_ext_rows, 2, sum(slices), dtype=torch.float32, device=device)
            ext[:, 1] = 1.0
        return cls(a, b, tuple(slices), pages, max_rank, ext)

    def __post_init__(self) -> None:
        n_slices, n_slots = self.a.shape[0], self.pages.num_slots
        dev = self.a.device
        offs = [sum(self.slices[:i]) for i in range(len(self.slices))]
        if self.pages.identity:
            self.a_slices = [self.a[i] for i in range(n_slices)]
            self.b_slices = [self.b[:, o:o + n] for o, n in zip(offs, self.slices)]
        else:  # no per-slot views: a slot's rows are spread over its pages
            self.a_slices = self.b_slices = []
        self.ranks = [[0] * n_slots for _ in range(n_slices)]
        self.scales = [[0.0] * n_slots for _ in range(n_slices)]
        self._on_device = [[(0, 0.0)] * n_slots for _ in range(n_slices)]
        self.ranks_t = torch.zeros(n_slices, n_slots, dtype=torch.int32, device=dev)
        self.scales_t = torch.zeros(n_slices, n_slots, dtype=torch.float32, device=dev)
        self.slice_meta = torch.tensor([[o, n] for o, n in zip(offs, self.slices)], dtype=torch.int32).to(dev)
        self.aligned = all(n % 8 == 0 for n in self.slices)

    @property
    def num_slices(self) -> int:
        return len(self.slices)

    def _paged(self, t: torch.Tensor, rank_dim: int, slot: int) -> torch.Tensor:
        """``t`` (rank along ``rank_dim``, rank <= max_rank) zero-padded to whole pages and split into them:
        (slot's pages, ..., page_rank) with the rank part last or in place, as the stack stores it."""
        P = self.pages.page_rank
        n = len(self.pages.pages_of(slot))
        if t.shape[rank_dim] != n * P:  # ranks that fill whole pages (8, 16, 32, 64) need no padded copy
            pad = [0, 0] * (t.dim() - 1 - rank_dim) + [0, n * P - t.shape[rank_dim]]
            t = torch.nn.functional.pad(t, pad)
        shape = list(t.shape)
        shape[rank_dim:rank_dim + 1] = [n, P]
        return t.reshape(shape).movedim(rank_dim, 0)

    def _batched(self, src: torch.Tensor) -> tuple[Optional[SlotWriter], Optional[int]]:
        """The model's slot writer and ``src``'s offset in its buffer, when ``src`` can go as pieces of one
        batched launch (paged slots, a view of the staged adapter in this stack's dtype); else (writer, None)."""
        writer = self.pages.writer
        if writer is None or self.pages.identity or src.dtype != self.a.dtype or src.dim() != 2:
            return writer, None
        return writer, writer.offset(src)

    def write_a(self, slot: int, i: int, a: torch.Tensor) -> None:
        """Slice ``i`` of ``slot`` <- A (r, in) (a host or device tensor; rows past r become zero)."""
        writer, off = self._batched(a)
        if off is not None:
            self.record_a(writer, off, len(self.pages.pages_of(slot)), i, a)
            return
        a = upload(a, self.a)
        if self.pages.identity:
            self.a[i, slot, :a.shape[0]].copy_(a)
            return
        self.a[i].index_copy_(0, self.pages.index(slot), self._paged(a.to(self.a.dtype), 0, slot))

    def record_a(self, writer: SlotWriter, off: int, n: int, i: int, a: torch.Tensor) -> None:
        """:meth:`write_a` as ``writer``'s pieces, one per page of the ``n`` a slot of the adapter takes: its P rank
        rows of A (a[i, page], (P, K)), zero past r; ``off``: A's offset in the staged buffer."""
        P, K, es = self.pages.page_rank, self.a.shape[3], self.a.element_size()
        base, rs, cs = self.a.data_ptr() + i * self.a.stride(0) * es, a.stride(0), a.stride(1)
        for j in range(n):
            writer.piece(es, base, j, P * K * es, off + j * P * rs, rs, cs, a.shape[0] - j * P, a.shape[1], P, K, K)

    def write_a_t(self, slot: int, a_t: torch.Tensor) -> None:
        """Embedding stacks: ``slot`` <- A transposed (vocab rows, r), from row 0; every other row of the slot's
        pages (padding vocabulary, the zero row of a vocabulary shard) becomes zero."""
        writer, off = self._batched(a_t)
        if off is not None:  # one piece per page: every vocabulary row, its P rank columns (a[0, page], (V, P))
            P, V, es = self.pages.page_rank, self.a.shape[2], self.a.element_size()
            rs, cs = a_t.stride(0), a_t.stride(1)
            for j in range(len(self.pages.pages_of(slot))):
                writer.piece(es, self.a.data_ptr(), j, V * P * es, off + j * P * cs, rs, cs, a_t.shape[0],
                             a_t.shape[1] - j * P, V, P, P)
            return
        a_t = upload(a_t, self.a).to(self.a.dtype)
        if self.pages.identity:
            self.a[0, slot, :a_t.shape[0], :a_t.shape[1]].copy_(a_t)
            return
        full = a_t.new_zeros(self.a.shape[2], a_t.shape[1])
        full[:a_t.shape[0]] = a_t
        self.a[0].index_copy_(0, self.pages.index(slot), self._paged(full, 1, slot))

    def write_b(self, slot: int, col: int, b: torch.Tensor, width: Optional[int] = None) -> None:
        """Columns ``col..col + width`` of ``slot``'s B <- b (n, r) in its first n rows, zero below (``width``:
        default n)."""
        width = width or b.shape[0]
        writer, off = self._batched(b)
        if off is not None:
            self.record_b(writer, off, len(self.pages.pages_of(slot)), col, b, width)
            return
        b = upload(b, self.b).to(self.b.dtype)
        if self.pages.identity:
            self.b[slot, col:col + b.shape[0], :b.shape[1]].copy_(b)
            return
        full = b
        if b.shape[0] != width:  # rows below the adapter's: zero
            full = b.new_zeros(width, b.shape[1])
            full[:b.shape[0]] = b
        self.b[:, col:col + width].index_copy_(0, self.pages.index(slot), self._paged(full, 1, slot))

    def record_b(self, writer: SlotWriter, off: int, n: int, col: int, b: torch.Tensor, width: int) -> None:
        """:meth:`write_b` as ``writer``'s pieces, one per page of the ``n`` a slot of the adapter takes: the
        slice's rows of it (b[page, col:col + width], (width, P)); ``off``: B's offset in the staged buffer."""
        P, N, es = self.pages.page_rank, self.b.shape[1], self.b.element_size()
        rs, cs = b.stride(0), b.stride(1)
        for j in range(n):
            writer.piece(es, self.b.data_ptr() + col * P * es, j, N * P * es, off + j * P * cs, rs, cs, b.shape[0],
                         b.shape[1] - j * P, width, P, P)

    def set(self, slot: int, i: int, rank: int, scale: float) -> None:
        """Record slice ``i`` of ``slot`` (its weights already written)."""
        self.ranks[i][slot] = rank
        self.scales[i][slot] = scale
        self._sync(slot)

    def clear(self, slot: int) -> None:
        """Forget every slice of ``slot`` (rank 0: nothing reads its rows; the padded layout also zeroes them)."""
        for i in range(self.num_slices):
            self.ranks[i][slot] = 0
            self.scales[i][slot] = 0.0
        if self.pages.identity:
            self.a[:, slot].zero_()
            self.b[slot].zero_()
        self._sync(slot)
        self.set_extras(slot, None, None)

    def set_extras(self, slot: int, bias: Optional[torch.Tensor], dora: Optional[torch.Tensor]) -> None:
        """``slot``'s LoRA bias (``scaling * bias`` per output column) and DoRA scale (per output column), either
        None; on the stack's device, float32 (needs ``ext``, and an extras row for the slot when either is set)."""
        if self.ext is None:
            assert bias is None and dora is None, "this stack keeps no per-slot extras (see LoRABackend.fuses_extras)"
            return
        row = self.pages.ext_row(slot)
        if row is None:
            assert bias is None and dora is None, f"slot {slot} has no extras row"
            return
        if self.pages.identity and (bias is not None or dora is not None):
            self.pages.ext_rows[slot].fill_(row)  # the kernels read it (PageTable.assign marks it for a model too)
        if bias is None:
            self.ext[row, 0].zero_()
        else:
            self.ext[row, 0].copy_(bias)
        if dora is None:
            self.ext[row, 1].fill_(1.0)
        else:
            self.ext[row, 1].copy_(dora)

    @contextlib.contextmanager
    def writing(self, slot: int) -> Iterator[None]:
        """Clears and writes of ``slot`` inside update the device ranks and scales once, at the end (an adapter
        load clears every slice and then sets the targeted ones)."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            self._sync(slot)

    def written(self, slot: int, i: int, rank: int, scale: float) -> None:
        """Slice ``i`` of ``slot`` holds ``rank`` and ``scale``, on the host and, once the words a slot writer
        records for them have run, on the device (a slot plan's load, or with zeros its clear)."""
        self.ranks[i][slot] = rank
        self.scales[i][slot] = scale
        self._on_device[i][slot] = (rank, scale)

    @staticmethod
    def word_addr(t: torch.Tensor, i: int, slot: int) -> int:
        """The address of ``t[i, slot]`` in ``ranks_t`` or ``scales_t`` ((slices, slots), 4-byte elements)."""
        return t.data_ptr() + (i * t.stride(0) + slot) * 4

    def _sync(self, slot: int) -> None:
        """The device mirrors of ``slot``'s ranks and scales <- the host's, entry by entry where they differ: a
        scalar fill each, so that an adapter load allocates no host buffers and makes no copies for them (a
        pinned allocation per slice, as before, cost slot loads tens of milliseconds of host time)."""
        if self._held:
            return
        writer = self.pages.writer
        for i in range(self.num_slices):
            want = (self.ranks[i][slot], self.scales[i][slot])
            have = self._on_device[i][slot]
            for t, w, h in ((self.ranks_t, want[0], have[0]), (self.scales_t, want[1], have[1])):
                if w != h:
                    if writer is not None:  # with the adapter's pages, in one launch
                        writer.word(self.word_addr(t, i, slot), w, t.dtype == torch.float32)
                    else:
                        t[i, slot].fill_(w)
            self._on_device[i][slot] = want


def upload(src: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``src`` on ``like``'s device without the host waiting for the device: a host tensor goes through
    pinned, contiguous memory and a non-blocking copy (a copy from pageable memory would first wait for the
    work queued on the stream). Copy the result into a strided destination on the device. CPU: ``src``."""
    if not like.is_cuda or src.is_cuda:
        return src
    if not (src.is_contiguous() and src.is_pinned()):
        src = src.contiguous().pin_memory()
    return src.to(like.device, non_blocking=True)


class LoRABackend(Protocol):
    name: str
    # Whether expand applies the stack's per-slot LoRA bias and DoRA scale itself (``LoRAStack.ext``): the
    # wrappers then keep none of them on the host, and steps with such adapters can replay CUDA graphs.
    fuses_extras: bool
    # Rank rows per page of the slots' memory (PageTable), or None for the padded layout (a page of max_rank rows
    # per slot, as many slots as max_loras).
    page_rank: Optional[int]

    def shrink(self, x: torch.Tensor, w: LoRAStack, batch: LoRABatch) -> torch.Tensor:
        """x (T, in) -> buf holding x[t] @ A_i[slot(t), :r].T for every slice (layout: the backend's)."""

    def start_shrink(self, x: torch.Tensor, w: LoRAStack, batch: LoRABatch) -> Callable[[], torch.Tensor]:
        """Begin :meth:`shrink` before the base layer's GEMM (which reads the same ``x``); the returned call gives
        ``buf``. A backend may run the shrink beside the GEMM; the plain way computes it at once."""

    def expand(self, y: torch.Tensor, buf: torch.Tensor, w: LoRAStack, batch: LoRABatch,
               bias: Optional[torch.Tensor] = None) -> None:
        """y (T, sum(slices)) += per-slice buf @ B_i[slot].T * scale_i[slot], in place; then, when the backend
        fuses extras, the slot's LoRA bias and DoRA rescaling (``bias``: the base layer's, which DoRA keeps)."""

    def embed(self, y: torch.Tensor, ids: torch.Tensor, w: LoRAStack, batch: LoRABatch) -> None:
        """y (T, hidden) += A_t[slot][ids, :r] @ B[slot][:, :r].T * scale[slot], in place (``w.a`` holds A_t)."""


_BACKENDS = {
    "torch": ("loraplex.lora.backends.torch_backend", "TorchLoRABackend"),
    "triton": ("loraplex.lora.backends.triton_backend", "TritonLoRABackend"),
}
NAMES = (*_BACKENDS, "auto")


def resolve_backend_name(name: str, device: Optional[torch.device] = None) -> str:
    """``auto`` -> ``triton`` on CUDA when triton imports, else ``torch``; other names unchanged."""
    return resolve_auto(name, device)


def get_backend(name: str, device: Optional[torch.device] = None) -> LoRABackend:
    """The backend registered as ``name`` (``auto``: see :func:`resolve_backend_name`)."""
    return load_backend("LoRA backend", "lora_backend", name, _BACKENDS, device)