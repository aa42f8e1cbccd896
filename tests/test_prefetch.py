"""The L2 prefetch kernels (loraplex.kernels.prefetch): a prefetch reads its tensor and changes nothing. On CPU
the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py), where ``bulk`` runs as
``load``; on CUDA ``bulk`` issues the copy engine's L2 prefetch."""

from __future__ import annotations

import os
from functools import reduce

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton kernels

from loraplex.kernels.prefetch import L2Prefetcher, prefetch_l2, sink_size  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(1000, 24), (8, 8)])
def test_load_prefetch_reads_every_word_once(shape) -> None:
    """The programs' XORs, XORed together, equal the XOR of every 32-bit word of the tensor: each word was
    loaded exactly once (a word missed, or read twice, would change it), the masked tail included."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(*shape, generator=g).to(torch.bfloat16).to(DEVICE)
    before = t.clone()
    sink = prefetch_l2(t, "load")
    words = t.view(-1).view(torch.int32).cpu().tolist()
    programs = min(-(-len(words) // 2048), sink_size(t.device))
    got = reduce(lambda a, b: a ^ b, sink[:programs].cpu().tolist(), 0)
    assert got == reduce(lambda a, b: a ^ b, words, 0)
    assert torch.equal(t, before)


def test_bulk_prefetch_leaves_the_tensor_unchanged() -> None:
    t = torch.randn(512, 64).to(torch.bfloat16).to(DEVICE)
    before = t.clone()
    prefetch_l2(t, "bulk")
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(t, before)


def test_prefetch_rejects_what_it_cannot_read() -> None:
    t = torch.zeros(16, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="contiguous"):
        prefetch_l2(t.t(), "load")
    with pytest.raises(ValueError, match="multiple of 16 bytes, got 6"):
        prefetch_l2(torch.zeros(3, dtype=torch.bfloat16), "load")
    with pytest.raises(ValueError, match="'bulk' or 'load', got 'fast'"):
        prefetch_l2(t, "fast")
    with pytest.raises(ValueError, match="'bulk' or 'load', got 'fast'"):
        L2Prefetcher("fast", 256)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side stream needs CUDA")
def test_prefetcher_forks_only_small_steps_and_joins() -> None:
    """Steps above ``max_tokens`` launch nothing; a fork is joined once, after which the side stream's work
    is ordered before the current stream's."""
    pf = L2Prefetcher("load", 64)
    w = torch.randn(256, 256, device="cuda").to(torch.bfloat16)
    pf.start(w, 65)
    assert not pf._forked
    pf.start(w, 64)
    assert pf._forked == {w.device}
    pf.join(w.device)
    assert not pf._forked
    torch.cuda.synchronize()
