"""Reference LoRA backend in plain PyTorch: a few batched matmuls per module, no loop over segments.

Works on CPU and CUDA; it is the numerical reference for the Triton kernels.
The rows of a layer's slots are grouped by slot once per batch (:func:`plan_tiles`, memoised on the
batch): each slot's rows are cut into tiles of ``h`` rows, the last one padded by repeating a real row,
so that one ``bmm`` over the tiles computes every slot at once, with each tile's weights gathered by
slot. Rows of the base model (slot -1) and of slots without weights in the layer are in no tile and are
never written, so they stay bit-exact. Ranks are padded to the largest rank among the tiles' slots; the
stack is zero beyond each slot's rank and in untargeted slices, so the padding adds exact zeros.
``buf`` is (T, slices, max_rank) in the input's dtype, zero on rows it does not compute.

Rounding follows PEFT's ``lora_B(lora_A(x)) * scaling`` added to the base output: the expand multiplies
the matmul result by the scale (in float32, as a Python float scale does) and rounds to the layer's
dtype before the one addition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from loraplex.lora.backends.base import LoRAStack
from loraplex.lora.batch import LoRABatch

# A tile whose weights are gathered (rather than sliced from the stack) costs about this many padded rows.
TILE_COST = 8


@dataclass
class TilePlan:
    """Rows of the slots ``slots`` grouped into ``tiles`` tiles of ``rows`` rows each (device tensors).

    ``gather`` (tiles * rows,): the batch row read into each padded position (None: the identity, every
    batch row in order and no padding); ``keep`` (n,): the padded positions that hold real rows (None: all
    of them); ``dst`` (n,): the batch row of each kept position;
    ``tile_slots`` (tiles,) and ``gather_slot`` (tiles * rows,): the slot of each tile and of each padded
    position. ``first_slot``: when the tiles are the consecutive
    slots ``first_slot, first_slot + 1, ...`` (one tile each), their weights are a slice of the stack
    rather than a gather.
    """

    slots: tuple[int, ...]
    tiles: int
    rows: int
    gather: Optional[torch.Tensor]
    keep: Optional[torch.Tensor]
    dst: torch.Tensor
    tile_slots: torch.Tensor
    gather_slot: torch.Tensor
    first_slot: Optional[int]


def _layout(slots: tuple[int, ...], counts: list[int]) -> tuple[int, bool]:
    """Rows per tile, and whether the weights are sliced from the stack (one tile per slot, the slots
    consecutive) rather than gathered.

    Cost in padded rows, each gathered tile counting ``TILE_COST`` more: tiles of the largest group (one
    per slot; decode) or of a power of two below it (one long prompt among short ones). A slot range with
    gaps is gathered: slicing it would read the weights of the slots between (measured slower on CPU).
    ``slots`` ascending, ``counts`` their rows."""
    top = max(counts)
    sliced = slots[-1] - slots[0] + 1 == len(slots)
    best, best_h = len(slots) * (top + (0 if sliced else TILE_COST)), top
    h = top
    while h > 1:
        h = h // 2 if h & (h - 1) == 0 else 1 << (h.bit_length() - 1)  # powers of two below top
        cost = sum(-(-c // h) for c in counts) * (h + TILE_COST)
        if cost < best:
            best, best_h, sliced = cost, h, False
    return best_h, sliced


def plan_tiles(batch: LoRABatch, slots: tuple[int, ...], rows: Optional[int] = None,
               sliced: Optional[bool] = None) -> TilePlan:
    """The tiles of the rows of ``slots`` (ascending, each with rows in the batch), memoised on the batch.
    ``rows`` / ``sliced`` force the layout (tests); by default :func:`_layout` picks it (slicing needs
    consecutive slots and one tile each; otherwise the weights are gathered)."""
    key = ("tiles", slots, rows, sliced)
    plan = batch.plans.get(key)
    if plan is not None:
        return plan
    wanted = set(slots)
    by_slot: dict[int, list[int]] = {s: [] for s in slots}
    for s, e, slot in zip(batch.seg_starts, batch.seg_ends, batch.seg_slots):
        if slot in wanted:
            by_slot[slot].extend(range(s, e))
    counts = [len(r) for r in by_slot.values()]
    h, auto_sliced = _layout(slots, counts)
    h = rows or h
    if sliced is None:
        sliced = auto_sliced if rows is None else h >= max(counts)
    sliced = sliced and h >= max(counts) and slots[-1] - slots[0] + 1 == len(slots)
    gather: list[int] = []
    keep: list[int] = []
    dst: list[int] = []
    tile_slots: list[int] = []
    for slot, rs in by_slot.items():
        for j in range(0, len(rs), h):
            chunk = rs[j:j + h]
            keep.extend(range(len(gather), len(gather) + len(chunk)))
            dst.extend(chunk)
            gather.extend(chunk + [chunk[-1]] * (h - len(chunk)))  # padding repeats a real row
            tile_slots.append(slot)
    n, padded = len(dst), len(gather)
    identity = padded == batch.num_rows and gather == list(range(padded))
    gather_slot = [slot for slot in tile_slots for _ in range(h)]
    # One host buffer, one copy to the device: gather | keep | dst | tile_slots | gather_slot.
    packed = torch.tensor(gather + keep + dst + tile_slots + gather_slot, dtype=torch.int64)
    packed = packed.to(batch.token_slots.device)
    a, b, c, d = padded, padded + n, padded + 2 * n, padded + 2 * n + len(tile_slots)
    plan = TilePlan(slots=slots, tiles=len(tile_slots), rows=h,
                    gather=None if identity else packed[:a],
                    keep=None if n == padded else packed[a:b],
                    dst=packed[b:c], tile_slots=packed[c:d], gather_slot=packed[d:],
                    first_slot=slots[0] if sliced else None)
    batch.plans[key] = plan
    return plan


def _plan(w: LoRAStack, batch: LoRABatch, rows: Optional[int] = None, sliced: Optional[bool] = None
          ) -> tuple[Optional[TilePlan], int, Optional[torch.Tensor]]:
    """The plan for the batch's slots that hold weights in ``w`` (None: no row to compute), the largest
    rank among them over every slice, and the tiles' scales, float32 (slices, tiles, 1, 1); memoised on
    the batch per stack (ranks and scales change only between forwards)."""
    key = (id(w), rows, sliced)
    got = batch.plans.get(key)
    if got is None:
        slots = tuple(s for s in sorted(batch.used_slots) if any(rk[s] for rk in w.ranks))
        if not slots:
            got = None, 0, None
        else:
            plan = plan_tiles(batch, slots, rows, sliced)
            rank = max(rk[s] for rk in w.ranks for s in slots)
            got = plan, rank, _per_tile(w.scales_t.T, plan).T.unsqueeze(-1).unsqueeze(-1)
        batch.plans[key] = got
    return got


def _per_tile(t: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """``t`` (slots, ...) -> (tiles, ...): the tiles' slots, sliced when consecutive, else gathered."""
    if plan.first_slot is not None:
        return t[plan.first_slot:plan.first_slot + plan.tiles]
    return t.index_select(0, plan.tile_slots)


def _shrink_tiles(x: torch.Tensor, w: LoRAStack, plan: TilePlan, r: int) -> torch.Tensor:
    """(T, in) -> (padded rows, slices, r): the shrink of every tile, one ``bmm`` per slice."""
    k, h = plan.tiles, plan.rows
    xt = (x if plan.gather is None else x.index_select(0, plan.gather)).reshape(k, h, -1)
    parts = [torch.bmm(xt, _per_tile(a[:, :r], plan).transpose(1, 2)) for a in w.a_slices]  # (tiles, h, r) each
    return (parts[0] if len(parts) == 1 else torch.stack(parts, dim=2)).view(k * h, w.num_slices, r)


def _expand_tiles(y: torch.Tensor, bt: torch.Tensor, w: LoRAStack, plan: TilePlan, r: int,
                  scales: torch.Tensor) -> None:
    """``y`` += the expand of ``bt`` (padded rows, slices, >= r), one ``bmm`` per slice; only the tiles'
    real rows are written (one ``index_add_``)."""
    k, h = plan.tiles, plan.rows
    parts = [torch.bmm(bt[:, i, :r].view(k, h, r), _per_tile(b[:, :, :r], plan).transpose(1, 2)) * scales[i]
             for i, b in enumerate(w.b_slices)]  # float32 (tiles, h, n_i): a loop over slices, not segments
    delta = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)).view(k * h, -1).to(y.dtype)
    if plan.keep is not None:
        delta = delta.index_select(0, plan.keep)
    y.index_add_(0, plan.dst, delta)


def shrink_reference(x: torch.Tensor, w: LoRAStack, batch: LoRABatch, rows: Optional[int] = None,
                     sliced: Optional[bool] = None) -> torch.Tensor:
    """``buf[t, i, :r] = x[t] @ A_i[slot(t), :r].T``; (T, in) -> (T, slices, max_rank), zero elsewhere.
    ``rows`` / ``sliced``: force the tile layout (any layout gives the same result up to float rounding)."""
    buf = x.new_zeros(x.shape[0], w.num_slices, w.max_rank)  # (tokens, slices, rank)
    plan, r, _ = _plan(w, batch, rows, sliced)
    if plan is None:
        return buf
    out = _shrink_tiles(x, w, plan, r)
    if plan.keep is not None:
        out = out.index_select(0, plan.keep)
    (buf if r == w.max_rank else buf[:, :, :r]).index_copy_(0, plan.dst, out)
    return buf


def expand_reference(y: torch.Tensor, buf: torch.Tensor, w: LoRAStack, batch: LoRABatch,
                     rows: Optional[int] = None, sliced: Optional[bool] = None) -> None:
    """``y[t, off_i:off_i+n_i] += buf[t, i, :r] @ B_i[slot(t), :, :r].T * scale_i[slot(t)]``, in place."""
    plan, r, scales = _plan(w, batch, rows, sliced)
    if plan is not None:
        _expand_tiles(y, buf if plan.gather is None else buf.index_select(0, plan.gather), w, plan, r, scales)


def embed_reference(y: torch.Tensor, ids: torch.Tensor, w: LoRAStack, batch: LoRABatch,
                    rows: Optional[int] = None, sliced: Optional[bool] = None) -> None:
    """``y[t] += A_t[slot(t)][ids[t], :r] @ B[slot(t), :, :r].T * scale[slot(t)]``, in place."""
    plan, r, scales = _plan(w, batch, rows, sliced)
    if plan is None:
        return
    ids_t = ids if plan.gather is None else ids.index_select(0, plan.gather)
    bt = w.a[0][plan.gather_slot, ids_t, :r]  # rows of A_t (zero beyond each slot's rank): exact
    _expand_tiles(y, bt.unsqueeze(1), w, plan, r, scales)


class TorchLoRABackend:
    """The references above, with ``buf`` in the tile layout (padded rows, slices, r) that the expand
    reads back as is: no scatter into (T, slices, max_rank) and gather out of it between the two steps.
    The layout is linear in the rows' contributions (padding rows repeat real ones), as row-parallel
    layers need for the all-reduce between shrink and expand. LoRA bias and DoRA are left to the wrappers
    (applied per segment, eagerly)."""

    name = "torch"
    fuses_extras = False
    page_rank = None  # the padded layout: its matmuls view each slot's max_rank block

    def shrink(self, x: torch.Tensor, w: LoRAStack, batch: LoRABatch) -> torch.Tensor:
        plan, r, _ = _plan(w, batch)
        if plan is None:
            return x.new_zeros(0, w.num_slices, 0)
        return _shrink_tiles(x, w, plan, r)

    def start_shrink(self, x: torch.Tensor, w: LoRAStack, batch: LoRABatch):
        """:meth:`shrink` now; the returned call gives its result (the Triton backend may overlap it)."""
        buf = self.shrink(x, w, batch)
        return lambda: buf

    def expand(self, y: torch.Tensor, buf: torch.Tensor, w: LoRAStack, batch: LoRABatch,
               bias: Optional[torch.Tensor] = None) -> None:
        plan, r, scales = _plan(w, batch)
        if plan is not None:
            _expand_tiles(y, buf, w, plan, r, scales)

    def embed(self, y: torch.Tensor, ids: torch.Tensor, w: LoRAStack, batch: LoRABatch) -> None:
        embed_reference(y, ids, w, batch)
