"""Triton LoRA kernels and backend against the torch reference.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here and in conftest.py before
triton is imported); on a CUDA machine they run compiled. Parametrised over dtype and adapter popularity
(identical, distinct, uniform, skewed), with base rows (slot -1) mixed in that must stay bit-exact, slots
of different ranks, fused slices with an untargeted slice (rank 0), and decode- and prefill-shaped batches.
"""

from __future__ import annotations

import os
import random
import re
from typing import Callable, Optional

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton kernels

pytest.importorskip("triton", reason="the Triton LoRA backend needs the triton package")

from helpers import make_adapter, make_tiny_model, random_lora_stack, run_compile_script  # noqa: E402
from loraplex import LLM, LoRARequest, SamplingParams  # noqa: E402
from loraplex.engine.context import AttentionMetadata, ForwardContext, forward_context  # noqa: E402
from loraplex.kernels.common import INTERPRET  # noqa: E402
from loraplex.kernels.lora_embed import lora_embed_gather  # noqa: E402
from loraplex.kernels.lora_expand import lora_expand  # noqa: E402
from loraplex.kernels.lora_shrink import GRAPH_LAUNCH, lora_shrink  # noqa: E402
from loraplex.lora.adapter import LoRAWeights  # noqa: E402
from loraplex.lora.backends.base import LoRAStack, PageTable, get_backend, resolve_backend_name  # noqa: E402
from loraplex.lora.backends.torch_backend import embed_reference, expand_reference, shrink_reference  # noqa: E402
from loraplex.lora.batch import LoRABatch  # noqa: E402
from loraplex.lora.layers import LinearWithLoRA, wrapper_for  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16]
POPULARITY = ["identical", "distinct", "uniform", "skewed"]
# slot -> rank of each of the three slices (0: slice not targeted); slot 5 holds no adapter at all
SLOT_RANKS = {0: [4, 8, 0], 1: [16, 16, 16], 2: [8, 0, 2], 3: [2, 2, 2], 4: [16, 1, 12]}
NUM_SLOTS = 6
SLICES = (136, 24, 40)  # q spans several output blocks; widths not multiples of the block


def _tol(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=5e-2)


def _seq_slots(popularity: str, n: int, rng: random.Random) -> list[int]:
    """Adapter slot of each of ``n`` sequences; every mix has base sequences (-1) and the empty slot 5."""
    if popularity == "identical":
        slots = [1] * n
    elif popularity == "distinct":
        slots = [i % NUM_SLOTS for i in range(n)]  # consecutive sequences never share a slot
    elif popularity == "uniform":
        slots = [rng.randrange(NUM_SLOTS) for _ in range(n)]
    else:  # skewed: most sequences on one adapter
        slots = rng.choices(range(NUM_SLOTS), weights=[1, 20, 2, 1, 1, 1], k=n)
    slots[2] = slots[-3] = -1
    if popularity != "identical":
        slots[4] = 5
    return slots


def _batch(popularity: str, shape: str, seed: int = 0) -> LoRABatch:
    rng = random.Random(seed)
    n = 12
    lens = [1] * n if shape == "decode" else [rng.randint(1, 40) for _ in range(n)]
    if shape == "prefill":
        lens[1] = 70  # several 64-row tiles in one segment
    return LoRABatch.from_seq_slots(_seq_slots(popularity, n, rng), lens, DEVICE)


def _stack(dtype: torch.dtype, K: int, max_rank: int = 16, slot_ranks=SLOT_RANKS, slices=SLICES) -> LoRAStack:
    return random_lora_stack(dtype, NUM_SLOTS, max_rank, K, slices, slot_ranks, DEVICE, b_over_sqrt_rank=True)


def _base_rows(batch: LoRABatch) -> torch.Tensor:
    return (batch.token_slots < 0) | (batch.token_slots == 5)


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("shape", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shrink_expand_match_reference(dtype, shape, popularity) -> None:
    K = 48
    w = _stack(dtype, K)
    batch = _batch(popularity, shape)
    assert (batch.block_m, batch.expand_block_m) == ((16, 16) if shape == "decode" else (64, 32))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch.num_rows, K, generator=g).to(dtype).to(DEVICE)
    y0 = torch.randn(batch.num_rows, sum(SLICES), generator=g).to(dtype).to(DEVICE)

    want_buf = shrink_reference(x, w, batch)
    parts = lora_shrink(x, w.a, w.ranks_t, batch.tiles, batch.block_m)
    assert parts.dtype == torch.float32 and parts.shape[1:] == want_buf.shape
    torch.testing.assert_close(parts.sum(0), want_buf.float(), **_tol(dtype))
    base = (batch.token_slots < 0)
    assert not parts[:, base].any()  # base rows: buf is zero

    want = y0.clone()
    expand_reference(want, want_buf, w, batch)
    got = y0.clone()
    lora_expand(got, parts, w.b, w.ranks_t, w.scales_t, w.slice_meta, max(SLICES), batch.expand_tiles,
                batch.expand_block_m)
    untouched = _base_rows(batch)
    assert untouched.any() and torch.equal(got[untouched], y0[untouched])  # bit-exact
    off = SLICES[0]
    for slot, ranks in SLOT_RANKS.items():  # an untargeted slice of a slot keeps its base values exactly
        if ranks[1] == 0:
            rows = batch.token_slots == slot
            assert torch.equal(got[rows, off:off + SLICES[1]], y0[rows, off:off + SLICES[1]])
    torch.testing.assert_close(got, want, **_tol(dtype))
    # a second launch of the same specialisation takes the cached compiled kernel (on CUDA): same result
    assert torch.equal(lora_shrink(x, w.a, w.ranks_t, batch.tiles, batch.block_m), parts)
    again = y0.clone()
    lora_expand(again, parts, w.b, w.ranks_t, w.scales_t, w.slice_meta, max(SLICES), batch.expand_tiles,
                batch.expand_block_m)
    assert torch.equal(again, got)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_k_and_wide_rank(dtype) -> None:
    """Split-K partials sum to the product; ranks beyond one 64-wide block (two rank blocks in shrink, a
    rank loop in expand); a max_rank that is not a power of two."""
    for K, max_rank, ranks, split_k, block_k in [(160, 16, SLOT_RANKS, 3, 32), (64, 80, {1: [80, 70, 0], 3: [5, 65, 64]}, 2, 16),
                                                 (40, 24, {0: [24, 3, 17]}, 1, None)]:
        w = _stack(dtype, K, max_rank, ranks)
        batch = _batch("uniform", "prefill", seed=K)
        x = torch.randn(batch.num_rows, K).to(dtype).to(DEVICE)
        parts = lora_shrink(x, w.a, w.ranks_t, batch.tiles, batch.block_m, split_k=split_k, block_k=block_k,
                            reduce=False)
        assert parts.shape[0] == split_k
        want_buf = shrink_reference(x, w, batch)
        torch.testing.assert_close(parts.sum(0), want_buf.float(), **_tol(dtype))
        # reduced in the kernel (the default): one split, the partials summed in split order, bit for bit
        summed = lora_shrink(x, w.a, w.ranks_t, batch.tiles, batch.block_m, split_k=split_k, block_k=block_k)
        want_sum = parts[0].clone()
        for s in range(1, split_k):
            want_sum += parts[s]
        rows = batch.token_slots >= -1  # every row lies in a tile here (base segments too)
        assert summed.shape == (1, *parts.shape[1:]) and torch.equal(summed[0][rows], want_sum[rows])
        # and the counters are left at zero: a second launch sums the same
        again = lora_shrink(x, w.a, w.ranks_t, batch.tiles, batch.block_m, split_k=split_k, block_k=block_k)
        assert torch.equal(again, summed)
        y0 = torch.randn(batch.num_rows, sum(SLICES)).to(dtype).to(DEVICE)
        want, got = y0.clone(), y0.clone()
        expand_reference(want, want_buf, w, batch)
        # expand on the shrink's 64-row tiles: any tile height works
        lora_expand(got, parts, w.b, w.ranks_t, w.scales_t, w.slice_meta, max(SLICES), batch.tiles, batch.block_m)
        torch.testing.assert_close(got, want, **_tol(dtype))
        assert torch.equal(got[batch.token_slots < 0], y0[batch.token_slots < 0])


def _paged_copy(w: LoRAStack, embedding: bool = False, page_rank: int = 8) -> LoRAStack:
    """The weights of the padded stack ``w`` in pages of ``page_rank`` rank rows (rank-aware memory), each slot's
    pages scattered in a shuffled order over a pool with spare pages."""
    slots, max_rank = w.pages.num_slots, w.max_rank
    pages = PageTable(slots, slots * -(-max_rank // page_rank) + 3, page_rank, max_rank, slots, DEVICE)
    random.Random(7).shuffle(pages._free)
    a_rows, a_cols = (w.a.shape[2], max_rank) if embedding else (max_rank, w.a.shape[3])
    p = LoRAStack.zeros(w.num_slices, slots, max_rank, a_rows, a_cols, w.slices, w.a.dtype, DEVICE, pages=pages)
    for slot in reversed(range(slots)):
        rank = max(w.ranks[i][slot] for i in range(w.num_slices))
        if not rank:
            continue
        pages.assign(slot, rank, ext=False)
        assert len(pages.pages_of(slot)) == -(-rank // page_rank)  # its own rank, not max_rank
        for i, n in enumerate(w.slices):
            r = w.ranks[i][slot]
            if r:
                if embedding:
                    p.write_a_t(slot, w.a[0, slot, :, :r])
                else:
                    p.write_a(slot, i, w.a[i, slot, :r])
                p.write_b(slot, sum(w.slices[:i]), w.b_slices[i][slot, :, :r])
                p.set(slot, i, r, w.scales[i][slot])
    return p


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_slots_equal_padded_slots(dtype) -> None:
    """Rank-aware packing: the same adapters stored by their own ranks in pages of 8 rank rows, scattered over
    the pool, give bit-identical shrink, expand and embedding results to the padded layout (max_rank per slot)."""
    K = 48
    w = _stack(dtype, K, max_rank=24, slot_ranks={0: [4, 8, 0], 1: [24, 16, 24], 2: [8, 0, 2], 4: [17, 1, 12]})
    p = _paged_copy(w)
    assert p.a.shape[1:3] == (6 * 3 + 3, 8) and not p.a_slices
    for shape in ("decode", "prefill"):
        batch = _batch("uniform", shape, seed=3)
        x = torch.randn(batch.num_rows, K).to(dtype).to(DEVICE)
        want = lora_shrink(x, w.a, w.ranks_t, batch.tiles, batch.block_m)
        got = lora_shrink(x, p.a, p.ranks_t, batch.tiles, batch.block_m, pages=p.pages.table, max_rank=24)
        assert torch.equal(got, want)
        y0 = torch.randn(batch.num_rows, sum(SLICES)).to(dtype).to(DEVICE)
        for vector_b in (False, True):
            ya, yb = y0.clone(), y0.clone()
            lora_expand(ya, want, w.b, w.ranks_t, w.scales_t, w.slice_meta, max(SLICES), batch.expand_tiles,
                        batch.expand_block_m, vector_b=vector_b)
            lora_expand(yb, got, p.b, p.ranks_t, p.scales_t, p.slice_meta, max(SLICES), batch.expand_tiles,
                        batch.expand_block_m, pages=p.pages.table, vector_b=vector_b)
            assert not torch.equal(ya, y0)
            if vector_b and INTERPRET:
                # B a page at a time takes rank blocks of two pages of 8 here and of 32 ranks padded; the GPU's
                # dot sums them in the same order (bit-identical on the H200), the interpreter's numpy may not
                torch.testing.assert_close(yb, ya, **_tol(dtype))
            else:
                assert torch.equal(yb, ya)

    vocab, hidden = 64, 40
    e = LoRAStack.zeros(1, NUM_SLOTS, 16, vocab, 16, (hidden,), dtype, DEVICE)
    g = torch.Generator().manual_seed(3)
    for slot, r in {0: 4, 1: 16, 3: 9}.items():
        e.a[0, slot, :50, :r] = torch.randn(50, r, generator=g).to(dtype)
        e.b_slices[0][slot, :, :r] = (torch.randn(hidden, r, generator=g) / r ** 0.5).to(dtype)
        e.set(slot, 0, r, 1.5)
    pe = _paged_copy(e, embedding=True)
    batch = _batch("uniform", "prefill", seed=5)
    ids = torch.randint(0, vocab, (batch.num_rows,), generator=g).to(DEVICE)
    y0 = torch.randn(batch.num_rows, hidden, generator=g).to(dtype).to(DEVICE)
    ya, yb = y0.clone(), y0.clone()
    get_backend("triton", DEVICE).embed(ya, ids, e, batch)
    get_backend("triton", DEVICE).embed(yb, ids, pe, batch)
    assert torch.equal(yb, ya) and not torch.equal(ya, y0)


def test_kernels_load_as_vectors_on_sm90() -> None:
    """Compiled for sm_90 (scripts/ptx_loads.py, in a process without the interpreter), the expand that loads B
    a page at a time reads it with 16-byte vector loads and no 2-byte ones (the element-wise load it replaces
    makes a load per element)."""
    run = run_compile_script("ptx_loads.py", "expand", "expand_vector_b")
    assert run.returncode == 0, run.stderr[-2000:]
    ops = {line.split(":")[0].strip(): line.split(":", 1)[1] for line in run.stdout.splitlines() if ":" in line}
    assert "ld.global.v4.b32" in ops["expand_vector_b"] and "ld.global.b16" not in ops["expand_vector_b"]
    assert "st.global.v4.b32" in ops["expand_vector_b"]  # rows of the delta, slices aligned to 8
    assert "ld.global.b16" in ops["expand"]


def test_resources_report_registers_and_spills() -> None:
    """``scripts/ptx_loads.py --resources`` reads registers and stack from the sm_90 cubin, and ``--maxnreg``
    compiles under a register cap (how the shrink's cap was checked before a GPU timed it: no gain, not kept)."""
    run = run_compile_script("ptx_loads.py", "shrink", "--resources", "--maxnreg", "64")
    assert run.returncode == 0, run.stderr[-2000:]
    registers, stack = (int(v) for v in re.search(r"registers (\d+), stack (\d+)", run.stdout).groups())
    assert 0 < registers <= 64 and stack == 0, run.stdout


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expand_with_b_a_page_at_a_time(dtype) -> None:
    """``vector_b`` (B loaded a page at a time, scalar page indices, so that a column's rank values are one
    vector load on a GPU) gives the reference's result: padded slots (rank blocks inside one page) and pages of
    8 rank rows scattered over the pool (rank blocks of two pages, the second one absent past the rank), ranks
    that end inside a page, decode and prefill tiles; bit for bit the element-wise load's result where the
    rank blocks are the same (padded, max_rank 16), and never a row or slice the adapters do not touch."""
    K = 48
    for max_rank, ranks in [(16, SLOT_RANKS), (24, {0: [4, 8, 0], 1: [24, 16, 24], 2: [8, 0, 2], 4: [17, 1, 12]}),
                            (64, {1: [64, 40, 9], 3: [33, 0, 64]}), (128, {1: [128, 70, 0], 2: [5, 0, 100]})]:
        w = _stack(dtype, K, max_rank, ranks)
        for stack in (w, _paged_copy(w)):  # padded: rank blocks of 64 inside pages of 128 at max_rank 128
            pages = None if stack is w else stack.pages.table
            for shape in ("decode", "prefill"):
                batch = _batch("uniform", shape, seed=max_rank)
                x = torch.randn(batch.num_rows, K).to(dtype).to(DEVICE)
                buf = shrink_reference(x, w, batch)
                y0 = torch.randn(batch.num_rows, sum(SLICES)).to(dtype).to(DEVICE)
                want, plain, got, unaligned = y0.clone(), y0.clone(), y0.clone(), y0.clone()
                expand_reference(want, buf, w, batch)
                parts = buf.float()[None]
                assert stack.aligned  # SLICES are multiples of 8: rows of y as vector stores
                for y, vec, aligned in ((plain, False, False), (got, True, True), (unaligned, True, False)):
                    lora_expand(y, parts, stack.b, stack.ranks_t, stack.scales_t, stack.slice_meta, max(SLICES),
                                batch.expand_tiles, batch.expand_block_m, pages=pages, vector_b=vec, aligned=aligned)
                torch.testing.assert_close(got, want, **_tol(dtype))
                assert torch.equal(unaligned, got)
                assert torch.equal(got[_base_rows(batch)], y0[_base_rows(batch)])
                if stack is w and max_rank == 16:
                    assert torch.equal(got, plain)
                else:
                    torch.testing.assert_close(got, plain, **_tol(dtype))


def test_padded_work_list_changes_nothing() -> None:
    """Tiles (0, 0, -1) are no-ops, so a work list padded to a fixed length (a CUDA graph's fixed grid, whatever
    the number of segments this step) gives the same result."""
    w = _stack(torch.float32, 48)
    batch = _batch("uniform", "decode")
    x = torch.randn(batch.num_rows, 48).to(DEVICE)
    pad = torch.tensor([[0, 0, -1]] * 7, dtype=torch.int64, device=DEVICE)
    tiles = torch.cat([batch.tiles, pad])
    parts = lora_shrink(x, w.a, w.ranks_t, batch.tiles, batch.block_m, split_k=1)
    assert torch.equal(lora_shrink(x, w.a, w.ranks_t, tiles, batch.block_m, split_k=1), parts)
    y0 = torch.randn(batch.num_rows, sum(SLICES)).to(DEVICE)
    want, got = y0.clone(), y0.clone()
    lora_expand(want, parts, w.b, w.ranks_t, w.scales_t, w.slice_meta, max(SLICES), batch.tiles, batch.block_m)
    lora_expand(got, parts, w.b, w.ranks_t, w.scales_t, w.slice_meta, max(SLICES), tiles, batch.block_m)
    assert torch.equal(got, want)


def test_tiles_past_the_device_count_are_not_read(monkeypatch) -> None:
    """With ``tile_count`` (a CUDA graph's real tiles, on the device) the kernels stop at that many tiles: tiles
    after them that would change rows (here copies of real tiles) change nothing. A grid of one program per SM
    strides over every item (the interpreter's grid is that small anyway)."""
    import loraplex.kernels.lora_expand as expand_mod
    import loraplex.kernels.lora_shrink as shrink_mod

    for mod in (expand_mod, shrink_mod):
        monkeypatch.setattr(mod, "programs_per_sm", lambda: 1)
    w = _stack(torch.float32, 48)
    batch = _batch("uniform", "decode")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(batch.num_rows, 48, generator=g).to(DEVICE)
    n = batch.tiles.shape[0]
    tiles = torch.cat([batch.tiles, batch.tiles])  # the copies would add every delta twice
    count = torch.tensor([n], dtype=torch.int64, device=DEVICE)
    parts = lora_shrink(x, w.a, w.ranks_t, batch.tiles, batch.block_m, split_k=2)
    got_parts = lora_shrink(x, w.a, w.ranks_t, tiles, batch.block_m, split_k=2, tile_count=count)
    rows = batch.token_slots >= 0  # rows past the count are never written: compare the real ones
    assert torch.equal(got_parts[:, rows], parts[:, rows])
    y0 = torch.randn(batch.num_rows, sum(SLICES), generator=g).to(DEVICE)
    want, got = y0.clone(), y0.clone()
    lora_expand(want, parts, w.b, w.ranks_t, w.scales_t, w.slice_meta, max(SLICES), batch.tiles, batch.block_m)
    lora_expand(got, parts, w.b, w.ranks_t, w.scales_t, w.slice_meta, max(SLICES), tiles, batch.block_m,
                tile_count=count)
    assert torch.equal(got, want) and not torch.equal(got, y0)
    twice = y0.clone()  # without the count the copies are read: the test would see them
    lora_expand(twice, parts, w.b, w.ranks_t, w.scales_t, w.slice_meta, max(SLICES), tiles, batch.block_m)
    assert not torch.equal(twice, want)


def test_device_split_count_follows_the_real_tiles() -> None:
    """``device_splits``: the shrink picks its split-K count on the device from the real tile count (about
    ``split_target`` items, at most the host's count). For each target, the result is bit for bit the
    sequential sum of the partials of a launch with that many splits chosen on the host, and it is the
    product."""
    w = _stack(torch.float32, 160)
    batch = _batch("uniform", "decode")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch.num_rows, 160, generator=g).to(DEVICE)
    n = batch.tiles.shape[0]
    tiles = torch.cat([batch.tiles, torch.tensor([[0, 0, -1]] * 5, dtype=torch.int64, device=DEVICE)])
    count = torch.tensor([n], dtype=torch.int64, device=DEVICE)
    want = shrink_reference(x, w, batch).float()
    rows = batch.token_slots >= 0  # rows outside the tiles are never written
    items = n * len(SLICES)  # one rank block
    for target, splits in ((1, 1), (2 * items, 2), (3 * items, 3), (10 ** 6, 5)):  # 5: the host's count
        got = lora_shrink(x, w.a, w.ranks_t, tiles, batch.block_m, split_k=5, block_k=32, tile_count=count,
                          device_splits=True, split_target=target)
        parts = lora_shrink(x, w.a, w.ranks_t, tiles, batch.block_m, split_k=splits, block_k=32, tile_count=count,
                            reduce=False)
        assert got.shape[0] == 1 and parts.shape[0] == splits
        seq = parts[0].clone()
        for p in parts[1:]:
            seq += p
        assert torch.equal(got[0][rows], seq[rows]), (target, splits)
        torch.testing.assert_close(got[0][rows], want[rows], rtol=1e-5, atol=1e-5)


def test_graph_launch_of_the_shrink_matches_the_eager_one() -> None:
    """The CUDA graph step's shrink (device splits) launches as ``GRAPH_LAUNCH`` says (K steps of 256, two warps,
    its own split target), not as the eager one: over K longer than two of its steps, with padding tiles, its
    sums equal the eager launch's and the reference."""
    w = _stack(torch.float32, 1040)  # 1040 = 4 x 256 + 16: a partial last K step
    batch = _batch("uniform", "decode")
    x = torch.randn(batch.num_rows, 1040, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    n = batch.tiles.shape[0]
    tiles = torch.cat([batch.tiles, torch.tensor([[0, 0, -1]] * 3, dtype=torch.int64, device=DEVICE)])
    count = torch.tensor([n], dtype=torch.int64, device=DEVICE)
    rows = batch.token_slots >= 0
    got = lora_shrink(x, w.a, w.ranks_t, tiles, batch.block_m, work_tiles=1, tile_count=count, device_splits=True)
    eager = lora_shrink(x, w.a, w.ranks_t, batch.tiles, batch.block_m).sum(0)
    assert GRAPH_LAUNCH["block_k"] == 256 and got.shape[0] == 1
    torch.testing.assert_close(got[0][rows], eager[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0][rows], shrink_reference(x, w, batch).float()[rows], rtol=1e-5, atol=1e-5)


def test_batch_segments_and_tiles() -> None:
    b = LoRABatch.from_row_slots([3, 3, -1, 0, 0, 0] + [2] * 40, DEVICE)
    assert (b.seg_starts, b.seg_ends, b.seg_slots) == ([0, 2, 3, 6], [2, 3, 6, 46], [3, -1, 0, 2])
    assert b.seg_indptr.tolist() == [0, 2, 3, 6, 46] and b.seg_slot_t.tolist() == [3, -1, 0, 2]
    assert b.token_slots.tolist() == [3, 3, -1, 0, 0, 0] + [2] * 40 and b.used_slots == {0, 2, 3}
    assert (b.max_seg_len, b.block_m, b.expand_block_m) == (40, 64, 32)
    assert b.tiles.tolist() == [[0, 2, 3], [2, 3, -1], [3, 6, 0], [6, 46, 2]]
    assert b.expand_tiles.tolist() == [[0, 2, 3], [2, 3, -1], [3, 6, 0], [6, 46, 2], [38, 46, 2]]
    assert torch.equal(b.tiles_for(32), b.expand_tiles) and b.tiles_for(16).shape[0] == 6
    # every device field on a 16-byte boundary, whatever the row count (kernels compile one variant)
    for n in range(1, 6):
        b = LoRABatch.from_row_slots([1] * n + [-1] + [0] * 20, DEVICE)
        fields = (b.token_slots, b.seg_indptr, b.seg_slot_t, b.tiles, b.expand_tiles)
        assert all(t.data_ptr() % 16 == 0 for t in fields), n
        assert b.seg_indptr.tolist() == [0, n, n + 1, n + 21] and b.token_slots.shape[0] == n + 21


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embedding_matches_reference(dtype, popularity) -> None:
    vocab, hidden = 128, 40
    w = LoRAStack.zeros(1, NUM_SLOTS, 16, vocab, 16, (hidden,), dtype, DEVICE)
    g = torch.Generator().manual_seed(3)
    for slot, ranks in SLOT_RANKS.items():
        r = ranks[0]
        w.a[0, slot, :100, :r] = torch.randn(100, r, generator=g).to(dtype)  # ids >= 100: padding rows stay zero
        w.b_slices[0][slot, :, :r] = (torch.randn(hidden, r, generator=g) / r ** 0.5).to(dtype)
        w.set(slot, 0, r, 1.5)
    batch = _batch(popularity, "prefill", seed=5)
    ids = torch.randint(0, vocab, (batch.num_rows,), generator=g).to(DEVICE)
    y0 = torch.randn(batch.num_rows, hidden, generator=g).to(dtype).to(DEVICE)

    buf = lora_embed_gather(ids, batch.token_slots, w.a[0], w.ranks_t[0])
    slots = batch.token_slots.clamp(min=0)
    want_buf = w.a[0][slots, ids].float() * (batch.token_slots >= 0)[:, None]
    for slot, ranks in SLOT_RANKS.items():
        want_buf[batch.token_slots == slot, ranks[0]:] = 0
    assert torch.equal(buf[0, :, 0], want_buf)

    want, got = y0.clone(), y0.clone()
    embed_reference(want, ids, w, batch)
    get_backend("triton", DEVICE).embed(got, ids, w, batch)
    assert torch.equal(got[_base_rows(batch)], y0[_base_rows(batch)])
    torch.testing.assert_close(got, want, **_tol(dtype))


def test_backend_registry() -> None:
    assert get_backend("triton", DEVICE).name == "triton"
    assert resolve_backend_name("auto", torch.device("cpu")) == "torch"  # CPU: never triton by default
    assert resolve_backend_name("torch", DEVICE) == "torch"
    with pytest.raises(ValueError, match="unknown LoRA backend 'nope'"):
        get_backend("nope")


# ---- the wrappers and the engine with the Triton backend -------------------------------------------------

@pytest.mark.parametrize("extras", [False, True], ids=["lora", "dora_bias"])
@pytest.mark.parametrize("base_name", ["ReplicatedLinear", "RowParallelLinear", "MergedColumnParallelLinear",
                                       "QKVParallelLinear", "VocabParallelEmbedding", "ParallelLMHead"])
def test_wrapper_triton_matches_torch(base_name, extras) -> None:
    """The Triton wrapper path equals the torch one, base rows bit-exact; ``dora_bias``: slot 2's adapter has
    DoRA magnitudes and slot 1's a LoRA bias (linear layers), which the Triton expand kernel applies in its
    epilogue (``LoRAStack.ext``) and the torch backend per segment on the host (``wrapper.dora`` / ``lora_bias``)."""
    from test_wrappers import BASE_LAYERS

    base_cls = next(c for c in BASE_LAYERS if c.__name__ == base_name)
    torch.manual_seed(0)
    base = BASE_LAYERS[base_cls]()
    for p in base.parameters():
        p.data.normal_()
    base.to(DEVICE)
    outs = []
    slots = [-1, 1, 1, -1, 0, 1, 2, 2]  # slot 0 holds nothing; slot 2 holds the second adapter
    n = len(slots)
    z = torch.zeros(n, dtype=torch.int64, device=DEVICE)
    attn = AttentionMetadata.build([1] * n, [1] * n, [[0]] * n, 1, DEVICE)  # n one-token sequences
    lb = LoRABatch.from_row_slots(slots, DEVICE)
    ctx = ForwardContext(positions=z, attn=attn, lora=lb, lora_logits=lb)
    is_emb = base_cls.__name__ == "VocabParallelEmbedding"
    in_f = base.embedding_dim if base_name == "ParallelLMHead" else getattr(base, "input_size", None)
    x = (torch.randint(0, base.org_vocab_size, (n,)) if is_emb else torch.randn(n, in_f)).to(DEVICE)
    for backend in ("torch", "triton", "triton_side"):
        wrapper = wrapper_for(base)(base)
        be = get_backend(backend.removesuffix("_side"), DEVICE)
        if backend == "triton_side":  # the expand into a float32 delta, added after the base layer's output
            be.side_expand = True
        wrapper.create_lora_weights(3, 8, be)
        g = torch.Generator().manual_seed(4)
        for slot, ranks in ((1, [4, 2, 8]), (2, [8, 8, 3])):
            if is_emb:
                weights = [LoRAWeights(torch.randn(ranks[0], base.org_vocab_size, generator=g),
                                       torch.randn(base.embedding_dim, ranks[0], generator=g), 0.5)]
            else:
                sizes = list(getattr(base, "output_sizes", None)
                             or [getattr(base, "output_size", None) or base.org_vocab_size])
                weights = [LoRAWeights(torch.randn(r, in_f, generator=g), torch.randn(s, r, generator=g), 0.25 * (i + 1))
                           for i, (s, r) in enumerate(zip(sizes, ranks))]
                if len(weights) > 1 and slot == 1:
                    weights[-1] = None  # the last slice is not targeted by this adapter
            if extras:
                for lw in weights:
                    if lw is None:
                        continue
                    if slot == 2:
                        lw.magnitude = torch.rand(lw.B.shape[0], generator=g) + 0.5
                    elif not is_emb:
                        lw.bias = torch.randn(lw.B.shape[0], generator=g)
            wrapper.set_lora(slot, weights)
            if extras:  # where the terms live: fused into the stack (Triton) or kept for the eager pass (torch)
                fused, has = backend != "torch", slot == 2 or not is_emb
                assert wrapper.fused_extras == fused and bool(wrapper.dora or wrapper.lora_bias) == (has and not fused)
                if fused:
                    assert wrapper.stack.pages.ext_rows.tolist() == [-1, 1 if not is_emb else -1, 2 if slot == 2 else -1]
        with torch.no_grad(), forward_context(ctx):
            outs.append(wrapper(x))
    want, got, side = outs
    plain = base(x)
    for row in (0, 3, 4):
        assert torch.equal(got[row], plain[row])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    if DEVICE.type == "cpu":  # the same float32 operations in the same order (a GPU may fuse a multiply-add)
        assert torch.equal(side, got)
    else:
        torch.testing.assert_close(side, got, rtol=1e-6, atol=1e-6)


def test_engine_triton_matches_torch(tmp_path, monkeypatch) -> None:
    """Same greedy tokens and prompt logprobs (1e-4, float32) with lora_backend='triton' as with 'torch'; and
    with the expand into a delta added after the base output (the default; LORAPLEX_LORA_SIDE_EXPAND=0 turns it
    off), the same as the in-place expand (bit for bit on the CPU); and with B loaded a page at a time
    (the default; LORAPLEX_LORA_VECTOR_B=0 loads it element by element), within 1e-4 of the torch backend too."""
    model_dir = make_tiny_model(tmp_path / "model", family="qwen2")
    paths = {
        "emb": make_adapter(model_dir, tmp_path / "emb", seed=1, r=8, lora_alpha=16,
                            target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]),
        "all": make_adapter(model_dir, tmp_path / "all", seed=2, r=4, lora_alpha=8, target_modules="all-linear",
                            rank_pattern={"down_proj": 2}),
    }
    prompts = [[5, 17, 33, 99, 120, 7, 8, 250], [3, 4, 5], [100, 101, 102, 103, 104, 105], [42, 43], [9, 8, 7, 6, 5]]
    adapters = ["emb", "all", None, "all", "emb"]
    params = SamplingParams(max_tokens=6, min_tokens=6, temperature=0.0, prompt_logprobs=1)
    results = {}
    from loraplex.kernels import lora_expand as expand_mod

    for backend in ("torch", "triton", "triton_side", "triton_vector_b"):
        monkeypatch.setenv("LORAPLEX_LORA_SIDE_EXPAND", "1" if backend == "triton_side" else "0")
        monkeypatch.setattr(expand_mod, "VECTOR_B", backend == "triton_vector_b")
        llm = LLM(model_dir, dtype="float32", device=DEVICE.type, max_loras=2, max_lora_rank=8, seed=0,
                  num_kv_blocks=32, block_size=4, lora_backend=backend.split("_")[0])
        be = next(m.backend for m in llm.engine.model.modules() if isinstance(m, LinearWithLoRA))
        assert getattr(be, "side_expand", False) == (backend == "triton_side")
        loras = [LoRARequest(a, paths[a]) if a else None for a in adapters]
        results[backend] = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=loras,
                                        use_tqdm=False)
    for ref, out, prompt in zip(results["torch"], results["triton_vector_b"], prompts):  # B a page at a time
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        for i in range(1, len(prompt)):
            assert out.prompt_logprobs[i][prompt[i]] == pytest.approx(ref.prompt_logprobs[i][prompt[i]], abs=1e-4)
    for ref, out, prompt in zip(results["torch"], results["triton"], prompts):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        for i in range(1, len(prompt)):
            assert out.prompt_logprobs[i][prompt[i]] == pytest.approx(ref.prompt_logprobs[i][prompt[i]], abs=1e-4)
    for ref, out, prompt in zip(results["triton"], results["triton_side"], prompts):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        for i in range(1, len(prompt)):
            same = out.prompt_logprobs[i][prompt[i]] == ref.prompt_logprobs[i][prompt[i]]
            assert same or (DEVICE.type != "cpu" and out.prompt_logprobs[i][prompt[i]] == pytest.approx(
                ref.prompt_logprobs[i][prompt[i]], abs=1e-5))


@pytest.mark.parametrize("fused", [True, False])
def test_folded_deltas_equal_added_deltas(tmp_path, monkeypatch, fused) -> None:
    """LORAPLEX_LORA_FOLD_DELTA=1: the qkv_proj, o_proj, down_proj and gate_up_proj deltas expanded beside the
    GEMM are folded into the rotary-and-cache kernel, the residual-add RMSNorm and SiLU-and-mul that read those
    outputs next (``fused``: the layer kernels, in the interpreter on the CPU; else the layers' PyTorch code after
    ``PendingDelta.added_to``, on CUDA too), with DoRA and LoRA bias on every linear layer and the qkv bias of qwen2:
    the same tokens and prompt logprobs as the separate add, bit for bit on the CPU and within 1e-5 on CUDA (float32
    sums in another order)."""
    from loraplex.kernels import layer_ops
    from loraplex.layers import activation, norm, rotary
    from test_peft_features import redraw_magnitudes

    model_dir = make_tiny_model(tmp_path / "model", family="qwen2")
    paths = {
        "dora": make_adapter(model_dir, tmp_path / "dora", seed=3, r=4, lora_alpha=8, use_dora=True,
                             target_modules="all-linear"),
        "bias": make_adapter(model_dir, tmp_path / "bias", seed=4, r=8, lora_alpha=8, lora_bias=True,
                             target_modules="all-linear"),
        "plain": make_adapter(model_dir, tmp_path / "plain", seed=5, r=4, target_modules=["q_proj", "down_proj"]),
    }
    redraw_magnitudes(paths["dora"], 6)
    folded = []
    for mod in (norm, activation, rotary):  # the layer kernels (in the interpreter on the CPU), or none on CUDA too
        monkeypatch.setattr(mod, "fused_ops", (lambda x: layer_ops) if fused else (lambda x: None))
    for name in ("rms_norm", "silu_and_mul", "rotary"):
        inner = getattr(layer_ops, name)
        monkeypatch.setattr(layer_ops, name, lambda *a, _f=inner, **kw: folded.append(kw.get("delta") is not None)
                            or _f(*a, **kw))
    prompts = [[5, 17, 33, 99, 120, 7, 8, 250], [3, 4, 5], [100, 101, 102, 103, 104, 105], [42, 43]]
    adapters = ["dora", "bias", None, "plain"]
    params = SamplingParams(max_tokens=5, min_tokens=5, temperature=0.0, prompt_logprobs=1, logprobs=1)
    results = {}
    for fold in ("0", "1"):
        monkeypatch.setenv("LORAPLEX_LORA_FOLD_DELTA", fold)
        llm = LLM(model_dir, dtype="float32", device=DEVICE.type, max_loras=3, max_lora_rank=8, seed=0,
                  num_kv_blocks=32, block_size=4, lora_backend="triton")
        wrappers = {n.rpartition(".")[2]: m for n, m in llm.engine.model.named_modules() if isinstance(m, LinearWithLoRA)}
        assert {k for k, m in wrappers.items() if m.fold_delta} == ({"qkv_proj", "o_proj", "down_proj", "gate_up_proj"}
                                                                    if fold == "1" else set())
        folded.clear()
        loras = [LoRARequest(a, paths[a]) if a else None for a in adapters]
        results[fold] = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=loras,
                                     use_tqdm=False)
        assert any(folded) == (fold == "1" and fused)
    for ref, out, prompt in zip(results["0"], results["1"], prompts):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert out.outputs[0].logprobs == ref.outputs[0].logprobs or DEVICE.type != "cpu"
        for i in range(1, len(prompt)):
            got, want = out.prompt_logprobs[i][prompt[i]], ref.prompt_logprobs[i][prompt[i]]
            assert got == want or (DEVICE.type != "cpu" and got == pytest.approx(want, abs=1e-5))


def test_unconsumed_pending_delta_fails_the_forward() -> None:
    """A deferred LoRA delta that no kernel took by the end of the forward raises, rather than being lost."""
    from loraplex.engine.context import defer_delta, take_delta

    meta = AttentionMetadata.build([1], [1], [[0]], 4, torch.device("cpu"))
    y = torch.zeros(3, 8)
    with forward_context(ForwardContext(positions=torch.zeros(1, dtype=torch.int64), attn=meta)):
        defer_delta(y, "pending")
        assert take_delta(torch.zeros(3, 8)) is None and take_delta(y) == "pending" and take_delta(y) is None
    with pytest.raises(RuntimeError, match=r"deferred to the kernel reading them next, and none did"):
        with forward_context(ForwardContext(positions=torch.zeros(1, dtype=torch.int64), attn=meta)):
            defer_delta(y, "pending")


def test_rank_aware_slots_hold_more_adapters(tmp_path) -> None:
    """The device memory of max_loras=2 adapters of max_lora_rank=16 holds four rank-8 adapters at once with the
    Triton backend (pages of 8 rank rows; the torch backend's padded slots hold two and take turns), one batch
    runs all four, and a rank-16 adapter then evicts the two least recently used; tokens and logprobs equal the
    padded slots'."""
    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    paths = {f"r8_{i}": make_adapter(model_dir, tmp_path / f"a{i}", seed=i, r=8, target_modules="all-linear")
             for i in range(4)}
    paths["r16"] = make_adapter(model_dir, tmp_path / "r16", seed=9, r=16, target_modules=["q_proj", "v_proj"])
    prompts = [{"prompt_token_ids": [5 + i, 17, 33, 99, 120, 7]} for i in range(4)]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0)
    results = {}
    for backend in ("torch", "triton"):
        llm = LLM(model_dir, dtype="float32", device=DEVICE.type, max_loras=2, max_lora_rank=16, seed=0,
                  num_kv_blocks=64, block_size=4, lora_backend=backend)
        first = llm.generate(prompts, params, use_tqdm=False,
                             lora_request=[LoRARequest(f"r8_{i}", paths[f"r8_{i}"]) for i in range(4)])
        pool = llm.engine.pool
        resident = sorted(n for n in pool.device_resident if n)
        assert pool.num_slots == (4 if backend == "triton" else 2) and pool.num_slot_loads == 4
        assert len(resident) == (4 if backend == "triton" else 2), resident
        last = llm.generate(prompts[:1], params, use_tqdm=False, lora_request=LoRARequest("r16", paths["r16"]))
        resident = sorted(n for n in pool.device_resident if n)
        if backend == "triton":  # r8_0 and r8_1 finished first: least recently used
            assert resident == ["r16", "r8_2", "r8_3"] and pool.lora_model.pages.free_pages == 0
        results[backend] = first + last
    for got, want in zip(results["triton"], results["torch"]):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for lg, lw in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
            assert lg.keys() == lw.keys() and all(abs(lg[t] - lw[t]) < 1e-4 for t in lg)


def test_a_starving_adapter_drains_only_the_slots_it_needs(tmp_path, monkeypatch) -> None:
    """Four rank-8 adapters fill the pages of max_loras=2 slots of rank 16, each with a steady stream of requests;
    a rank-16 adapter needs two pages. Once it has starved STARVATION_ROUNDS rounds, the two slots with the fewest
    running requests stop taking new ones (and only those: the other two keep admitting), drain, and it gets
    their pages while the streams go on."""
    from loraplex.engine import scheduler as scheduler_mod

    monkeypatch.setattr(scheduler_mod, "STARVATION_ROUNDS", 3)
    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    llm = LLM(model_dir, dtype="float32", device=DEVICE.type, max_loras=2, max_lora_rank=16, seed=0,
              num_kv_blocks=256, block_size=4, lora_backend="triton", max_num_seqs=12)
    for i in range(4):
        llm.add_lora(LoRARequest(f"r8_{i}", make_adapter(model_dir, tmp_path / f"a{i}", seed=i, r=8)))
    llm.add_lora(LoRARequest("r16", make_adapter(model_dir, tmp_path / "r16", seed=9, r=16)))
    eng = llm.engine
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    n = 0
    drain_windows: list[tuple[set, set]] = []  # (slots draining, adapters admitted that step)
    started = None
    for step in range(60):
        for i in range(4):
            eng.add_request({"prompt_token_ids": [5 + i, 17, 33]}, params, f"r8_{i}", f"s{n}")
            n += 1
        if step == 1:
            eng.add_request({"prompt_token_ids": [9, 8, 7]}, params, "r16", "cold")
        before = {r.request_id for r in eng.scheduler.running}
        in_slots = list(eng.pool.device_resident)
        eng.step()
        admitted = {r.adapter.name for r in eng.scheduler.running if r.request_id not in before} - {"r16"}
        if eng.scheduler._drain is not None:  # the slots drained this step, and what they held before it
            drain_windows.append(({in_slots[s] for s in eng.scheduler._drain[1]}, admitted))
        cold = eng.requests.get("cold")
        if cold is not None and cold.num_computed_tokens:
            started = step
            break
    assert started is not None, "the rank-16 adapter never got a slot while the streams ran"
    assert drain_windows, "it never starved: the test did not exercise the drain"
    for held, admitted in drain_windows:
        assert len(held) == 2 and None not in held  # two rank-8 adapters make room for rank 16, not all four
        assert not admitted & held  # nothing joins a draining slot ...
    assert any(admitted for _, admitted in drain_windows)  # ... while the other slots keep admitting
    while eng.has_unfinished_requests():
        eng.step()


def test_slot_writes_set_device_ranks_and_scales_once_without_host_buffers(monkeypatch) -> None:
    """An adapter load (clear every slice, set the targeted ones) updates the kernels' ranks and scales once per
    entry that changed, by scalar fills: no host tensor is built for them (on CUDA each would be a pinned
    allocation and a copy per slice, which made slot loads cost tens of milliseconds of host time)."""
    stack = LoRAStack.zeros(3, 4, 16, 16, 32, (8, 4, 4), torch.float32, torch.device("cpu"))
    fills, built = [], []
    real_fill, real_tensor = torch.Tensor.fill_, torch.tensor
    monkeypatch.setattr(torch.Tensor, "fill_", lambda t, v: (fills.append(v), real_fill(t, v))[1])
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: (built.append(a), real_tensor(*a, **k))[1])

    def load(slot: int, entries: dict[int, tuple[int, float]]) -> None:
        with stack.writing(slot):
            stack.clear(slot)
            for i, (rank, scale) in entries.items():
                stack.set(slot, i, rank, scale)

    load(2, {0: (8, 0.5), 2: (4, 2.0)})
    assert stack.ranks_t[:, 2].tolist() == [8, 0, 4] and stack.scales_t[:, 2].tolist() == [0.5, 0.0, 2.0]
    assert len(fills) == 4 and not built  # two entries, a rank and a scale each
    fills.clear()
    load(2, {0: (8, 0.5), 2: (4, 2.0)})  # the same adapter again: nothing changes on the device
    assert not fills
    load(2, {1: (16, 1.0)})  # another adapter in the slot: the old entries cleared, the new one set
    assert stack.ranks_t[:, 2].tolist() == [0, 16, 0] and stack.scales_t[:, 2].tolist() == [0.0, 1.0, 0.0]
    assert len(fills) == 6 and not built
    stack.clear(2)  # outside writing(): at once
    assert stack.ranks_t.abs().sum() == 0 and stack.scales_t.abs().sum() == 0
    assert stack.ranks_t[:, [0, 1, 3]].abs().sum() == 0  # other slots never touched


def _spy_slot_writes(monkeypatch, name: str, record: Callable) -> None:
    """Wrap ``kernels.slot_write.<name>`` (the copy or the words launch): ``record`` sees each call's arguments."""
    from loraplex.kernels import slot_write

    real = getattr(slot_write, name)
    monkeypatch.setattr(slot_write, name, lambda *a: (record(*a), real(*a))[1])


def _engine_with(model_dir, paths: dict, batched: bool, monkeypatch, **kw) -> LLM:
    """A Triton-backend engine on the tiny model with ``paths`` registered, its slot loads batched (one launch)
    or tensor by tensor."""
    monkeypatch.setenv("LORAPLEX_BATCHED_SLOT_WRITES", "1" if batched else "0")
    llm = LLM(model_dir, dtype="float32", device=DEVICE.type, seed=0, num_kv_blocks=64, block_size=4,
              lora_backend="triton", **kw)
    for name, path in paths.items():
        llm.add_lora(LoRARequest(name, path))
    return llm


def _acquire_now(pool, adapter):
    """``pool.acquire(adapter)``, waiting on CUDA for the upload it starts (a side stream's copy: by default the
    pool admits a slot once that has completed)."""
    slot = pool.acquire(adapter)
    if slot is None and DEVICE.type == "cuda":
        torch.cuda.synchronize()
        slot = pool.acquire(adapter)
    return slot


def _slot_state(lm, host: bool = True) -> list[torch.Tensor]:
    """Every slot-dependent tensor of a LoRAModel (page table, extras rows, each stack's weights, ranks, scales,
    extras), and with ``host`` the wrappers' host entries (ranks, scales, active slots)."""
    out = [lm.pages.table.clone(), lm.pages.ext_rows.clone()]
    for wm in lm.modules:
        st = wm.wrapper.stack
        out += [st.a.clone(), st.b.clone(), st.ranks_t.clone(), st.scales_t.clone()]
        if host:
            out += [torch.tensor(st.ranks), torch.tensor(st.scales), torch.tensor(sorted(wm.wrapper.active))]
        if st.ext is not None:
            out.append(st.ext.clone())
    return out


def test_batched_slot_writes_equal_per_tensor_writes(tmp_path, monkeypatch) -> None:
    """An adapter load into paged slots as one batched launch (kernels/slot_write.py: pieces read from the
    staged adapter in place) leaves every stack, rank, scale and extras row bit for bit as the per-tensor
    writes do: ranks that fill pages and ranks that do not (12: a half-empty second page, zero-filled),
    embedding and head LoRA (A transposed, padded vocabulary rows zero), LoRA bias and DoRA extras, and
    adapters overwriting pages that other adapters held; the plain all-linear adapters by their slot plans
    (lora/slot_plan.py: built once, replayed by every load and clear), the others through set_lora, each
    overwriting the other's slots, with the same host entries (ranks, scales, active slots) as well. So too
    with a staging buffer (the CUDA default: the staged adapter copied to the device first, then the kernel
    reads it there), sized by ``staging_bytes`` (every adapter here fits) or smaller (the larger ones are read
    in place)."""
    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    specs = {
        "a12": dict(seed=1, r=12, target_modules="all-linear"),
        "e8": dict(seed=2, r=8, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]),
        "bias": dict(seed=3, r=8, lora_bias=True, target_modules=["o_proj", "gate_proj"]),
        "dora": dict(seed=4, r=16, use_dora=True, target_modules=["k_proj", "down_proj"]),
        "big": dict(seed=5, r=24, target_modules="all-linear"),
        "q8": dict(seed=6, r=8, target_modules=["q_proj"]),
    }
    paths = {n: make_adapter(model_dir, tmp_path / n, **kw) for n, kw in specs.items()}
    launches, word_addrs = [], []
    staged: list[bool] = []  # per copy launch: whether it read the staging buffer
    buffer: list[Optional[torch.Tensor]] = [None]

    def record_copy(src, desc, *rest) -> None:
        launches.append(desc.shape[0])
        staged.append(buffer[0] is not None and src.untyped_storage().data_ptr() == buffer[0].data_ptr())

    _spy_slot_writes(monkeypatch, "copy_pieces", record_copy)
    # each launch sets an address once (its lanes' stores to one address would land in no set order on a GPU)
    _spy_slot_writes(monkeypatch, "write_words", lambda *a: word_addrs.append(a[0].tolist()))

    def slots(batched: bool, staging: str = "none") -> list[torch.Tensor]:
        pool = _engine_with(model_dir, paths, batched, monkeypatch, max_loras=2, max_lora_rank=24).engine.pool
        launches.clear()  # start-up's warm-up launch (kernels/slot_write.py: warm_up) on a GPU reads no adapter
        staged.clear()
        lm = pool.lora_model
        sizes = sorted(pool.get(n).packed[1].numel() for n in paths)
        assert sizes[-1] <= lm.staging_bytes()  # the bound holds for every adapter without trainable tokens
        n = {"none": 0, "fits": lm.staging_bytes(), "some": sizes[len(sizes) // 2]}[staging]
        lm.staging = buffer[0] = torch.zeros(n, dtype=torch.uint8, device=DEVICE) if n else None
        # later loads evict earlier ones, planned and not, and take their pages
        for group in (["a12", "e8"], ["bias", "dora"], ["big"], ["e8", "a12"], ["big"], ["a12", "bias"],
                      ["q8", "dora", "e8"], ["big", "q8"]):
            held = []
            for name in group:
                slot = _acquire_now(pool, pool.get(name))
                assert slot is not None, name
                held.append(slot)
            for slot in held:
                pool.release(slot)
        planned = {n for n in paths if pool.get(n).slot_plan and pool.get(n).slot_plan[1] is not None}
        assert planned == ({"a12", "big", "q8"} if batched else set()), planned
        return _slot_state(pool.lora_model)

    want = slots(batched=False)
    assert not launches
    for staging in ("none", "fits", "some"):
        got = slots(batched=True, staging=staging)
        assert launches and sum(launches) > len(launches)  # pieces went through the batched kernel
        assert {"none": not any(staged), "fits": all(staged), "some": any(staged) and not all(staged)}[staging], \
            (staging, staged)
        assert word_addrs and all(len(set(addrs)) == len(addrs) for addrs in word_addrs)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert torch.equal(g, w), staging


def test_slot_plan_overwriting_a_slot_sets_each_word_once(tmp_path, monkeypatch) -> None:
    """With every slot full (two pages, two rank-8 adapters), a rank-16 adapter overwrites one slot and clears the
    other: one words launch clears the old adapter's ranks and scales and sets the new one's at the same
    addresses, so it must hold each address once, with the load's value (on a GPU the kernel's stores to one
    address land in no set order); the slots then equal the per-tensor writes'."""
    model_dir = make_tiny_model(tmp_path / "model", family="llama")
    paths = {n: make_adapter(model_dir, tmp_path / n, seed=i, r=r, target_modules="all-linear")
             for i, (n, r) in enumerate([("x8", 8), ("y8", 8), ("z16", 16)])}
    launches: list[list[int]] = []
    _spy_slot_writes(monkeypatch, "write_words", lambda *a: launches.append(a[0].tolist()))

    def slots(batched: bool) -> list[torch.Tensor]:
        pool = _engine_with(model_dir, paths, batched, monkeypatch, max_loras=1, max_lora_rank=16).engine.pool
        launches.clear()  # start-up's warm-up launch (kernels/slot_write.py: warm_up) on a GPU
        for name in paths:
            pool.release(_acquire_now(pool, pool.get(name)))
        assert pool.device_resident.count("z16") == 1 and pool.num_slot_loads == 3
        return _slot_state(pool.lora_model, host=False)

    want = slots(batched=False)
    assert not launches
    got = slots(batched=True)
    assert len(launches) == 4  # the two loads; then the clear of one slot, and the overwrite of the other
    assert all(len(set(addrs)) == len(addrs) for addrs in launches)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_lora_overlap_default_follows_tensor_parallelism(monkeypatch) -> None:
    """The shrink runs beside the base GEMM by default with one rank, not under tensor parallelism (not yet run
    on GPUs there); LORAPLEX_LORA_OVERLAP=0 or 1 decides either way."""
    from loraplex.distributed import parallel_state as ps
    from loraplex.lora.backends.triton_backend import TritonLoRABackend

    monkeypatch.delenv("LORAPLEX_LORA_OVERLAP", raising=False)
    assert TritonLoRABackend().overlap
    monkeypatch.setenv("LORAPLEX_LORA_OVERLAP", "0")
    assert not TritonLoRABackend().overlap
    monkeypatch.setattr(ps, "_TP_SIZE", 2)
    assert not TritonLoRABackend().overlap
    monkeypatch.delenv("LORAPLEX_LORA_OVERLAP")
    assert not TritonLoRABackend().overlap
    monkeypatch.setenv("LORAPLEX_LORA_OVERLAP", "1")
    assert TritonLoRABackend().overlap
