"""The torch LoRA backend (the reference of the Triton kernels) computes every segment in a few batched
matmuls; whatever tile layout it picks (one tile per slot for decode, smaller gathered tiles when one long
prompt shares the batch), it equals the per-segment definition, and rows of the base model or of a slot
without weights in the layer stay bit-exact."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import random_lora_stack
from loraplex.lora.backends.base import LoRAStack, get_backend
from loraplex.lora.backends.torch_backend import embed_reference, expand_reference, plan_tiles, shrink_reference
from loraplex.lora.batch import LoRABatch

CPU = torch.device("cpu")
# slot -> rank of each of the three slices (0: not targeted); slot 5 holds nothing; slot 6 is unused
SLOT_RANKS = {0: [4, 8, 0], 1: [16, 16, 16], 2: [8, 0, 2], 3: [2, 2, 2], 4: [16, 1, 12], 7: [3, 5, 7]}
NUM_SLOTS, MAX_RANK, K = 8, 16, 40
SLICES = (36, 12, 20)
LAYOUTS = [dict(), dict(rows=1), dict(rows=3), dict(rows=64), dict(rows=64, sliced=False)]


def _stack(dtype: torch.dtype) -> LoRAStack:
    return random_lora_stack(dtype, NUM_SLOTS, MAX_RANK, K, SLICES, SLOT_RANKS, CPU, b_over_sqrt_rank=False)


def _batch(shape: str) -> LoRABatch:
    rng = random.Random(0)
    slots = [-1, 0, 1, 2, 3, 4, 5, 7, 1, 1, -1, 3, 0]
    if shape == "decode":
        lens = [1] * len(slots)
    elif shape == "prefill":
        lens = [rng.randint(1, 30) for _ in slots]
    else:  # one long prompt among decodes
        lens = [1] * len(slots)
        lens[4] = 150
    return LoRABatch.from_seq_slots(slots, lens, CPU)


def _shrink_loop(x: torch.Tensor, w: LoRAStack, batch: LoRABatch) -> torch.Tensor:
    """The definition, one segment and slice at a time."""
    buf = x.new_zeros(x.shape[0], w.num_slices, w.max_rank)
    for s, e, slot in zip(batch.seg_starts, batch.seg_ends, batch.seg_slots):
        for i, a in enumerate(w.a_slices):
            r = w.ranks[i][slot] if slot >= 0 else 0
            if r:
                buf[s:e, i, :r] = x[s:e] @ a[slot, :r].T
    return buf


def _expand_loop(y: torch.Tensor, buf: torch.Tensor, w: LoRAStack, batch: LoRABatch) -> None:
    for s, e, slot in zip(batch.seg_starts, batch.seg_ends, batch.seg_slots):
        off = 0
        for i, (b, n) in enumerate(zip(w.b_slices, w.slices)):
            r = w.ranks[i][slot] if slot >= 0 else 0
            if r:
                y[s:e, off:off + n] += (buf[s:e, i, :r] @ b[slot, :, :r].T) * w.scales[i][slot]
            off += n


def _untouched(batch: LoRABatch) -> torch.Tensor:
    return (batch.token_slots < 0) | (batch.token_slots == 5)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("shape", ["decode", "prefill", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shrink_expand_equal_per_segment_definition(dtype, shape, layout) -> None:
    w, batch = _stack(dtype), _batch(shape)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch.num_rows, K, generator=g).to(dtype)
    y0 = torch.randn(batch.num_rows, sum(SLICES), generator=g).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)

    want_buf = _shrink_loop(x, w, batch)
    buf = shrink_reference(x, w, batch, **layout)
    assert buf.shape == want_buf.shape and buf.dtype == dtype
    torch.testing.assert_close(buf, want_buf, **tol)
    assert not buf[_untouched(batch)].any()
    for slot, ranks in SLOT_RANKS.items():  # zero beyond each slot's rank, in every slice
        rows = batch.token_slots == slot
        for i, r in enumerate(ranks):
            assert not buf[rows, i, r:].any()

    want, got = y0.clone(), y0.clone()
    _expand_loop(want, want_buf, w, batch)
    expand_reference(got, buf, w, batch, **layout)
    untouched = _untouched(batch)
    assert untouched.any() and torch.equal(got[untouched], y0[untouched])  # bit-exact
    rows = batch.token_slots == 2  # slot 2 does not target slice 1: those columns keep their base values
    assert torch.equal(got[rows, SLICES[0]:SLICES[0] + SLICES[1]], y0[rows, SLICES[0]:SLICES[0] + SLICES[1]])
    torch.testing.assert_close(got, want, **tol)
    if not layout:  # the backend's own buf layout (the tiles') gives the references' result
        backend = get_backend("torch")
        again = y0.clone()
        backend.expand(again, backend.shrink(x, w, batch), w, batch)
        assert torch.equal(again, got)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_embedding_equals_per_segment_definition(layout) -> None:
    vocab, hidden = 64, 24
    w = LoRAStack.zeros(1, NUM_SLOTS, MAX_RANK, vocab, MAX_RANK, (hidden,), torch.float32, CPU)
    g = torch.Generator().manual_seed(3)
    for slot, ranks in SLOT_RANKS.items():
        r = ranks[0]
        w.a[0, slot, :, :r] = torch.randn(vocab, r, generator=g)
        w.b_slices[0][slot, :, :r] = torch.randn(hidden, r, generator=g)
        w.set(slot, 0, r, 1.5)
    batch = _batch("mixed")
    ids = torch.randint(0, vocab, (batch.num_rows,), generator=g)
    y0 = torch.randn(batch.num_rows, hidden, generator=g)
    want, got = y0.clone(), y0.clone()
    for s, e, slot in zip(batch.seg_starts, batch.seg_ends, batch.seg_slots):
        r = w.ranks[0][slot] if slot >= 0 else 0
        if r:
            want[s:e] += (w.a[0, slot, ids[s:e], :r] @ w.b_slices[0][slot, :, :r].T) * w.scales[0][slot]
    embed_reference(got, ids, w, batch, **layout)
    assert torch.equal(got[_untouched(batch)], y0[_untouched(batch)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_layout_choice() -> None:
    """Decode: one tile per slot, weights sliced when the slots are consecutive; one long prompt among
    decodes: tiles shorter than the long group, so the short ones are not padded to its length."""
    slots = (0, 1, 2, 3, 4, 7)
    plan = plan_tiles(_batch("decode"), slots)
    assert (plan.tiles, plan.rows, plan.first_slot) == (6, 3, None)  # slot 1 has 3 rows; 5, 6 absent: gather
    plan = plan_tiles(_batch("decode"), (0, 1, 2, 3, 4))
    assert (plan.tiles, plan.rows, plan.first_slot) == (5, 3, 0)
    assert plan.keep is not None and plan.keep.numel() == plan.dst.numel() == 9
    plan = plan_tiles(_batch("mixed"), slots)
    assert plan.rows < 150 and plan.first_slot is None
    assert plan.tiles * plan.rows < 2 * plan.dst.numel()
    single = LoRABatch.from_row_slots([3] * 5, CPU)  # every row on one slot: no gather, no padding
    plan = plan_tiles(single, (3,))
    assert plan.gather is None and plan.keep is None and plan.first_slot == 3
