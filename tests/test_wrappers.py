"""Every LoRA wrapper stands in for its base layer: every attribute of the base
layer reads the same through the wrapper, and base-model rows are untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraplex.engine.context import AttentionMetadata, ForwardContext, forward_context
from loraplex.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from loraplex.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                    ReplicatedLinear, RowParallelLinear)
from loraplex.lora.adapter import LoRAWeights
from loraplex.lora.backends.base import get_backend
from loraplex.lora.batch import LoRABatch
from loraplex.lora.layers import WRAPPERS, BaseLayerWithLoRA, wrapper_for

BASE_LAYERS = {
    ReplicatedLinear: lambda: ReplicatedLinear(32, 24, bias=True),
    ColumnParallelLinear: lambda: ColumnParallelLinear(32, 24, bias=True),
    RowParallelLinear: lambda: RowParallelLinear(32, 24, bias=False),
    MergedColumnParallelLinear: lambda: MergedColumnParallelLinear(32, [20, 20]),
    QKVParallelLinear: lambda: QKVParallelLinear(32, 8, 4, 2, bias=True),
    VocabParallelEmbedding: lambda: VocabParallelEmbedding(100, 32),
    ParallelLMHead: lambda: ParallelLMHead(100, 32),
}


def _public_attributes(obj: nn.Module) -> list[str]:
    names = set(vars(obj)) | {n for n in dir(type(obj)) if not n.startswith("__")}
    names |= set(obj._parameters) | set(obj._buffers) | set(obj._modules)
    return sorted(n for n in names if not n.startswith("_") and n not in dir(nn.Module))


def test_every_wrapper_class_is_covered() -> None:
    assert {b for b, _ in WRAPPERS} == set(BASE_LAYERS)


@pytest.mark.parametrize("base_cls", list(BASE_LAYERS), ids=lambda c: c.__name__)
def test_wrapper_forwards_every_base_attribute(base_cls) -> None:
    base = BASE_LAYERS[base_cls]()
    wrapper = wrapper_for(base)(base)
    assert isinstance(wrapper, BaseLayerWithLoRA)
    wrapper.create_lora_weights(2, 4, get_backend("torch"))
    attrs = _public_attributes(base)
    assert "weight" in attrs
    for name in attrs:
        want = getattr(base, name)
        got = getattr(wrapper, name)
        if name in ("forward", "weight_loader", "extra_repr") or callable(want) and not isinstance(want, nn.Module):
            continue  # bound methods differ in identity; the attribute must exist
        if isinstance(want, torch.Tensor):
            assert got is want, name
        else:
            assert got == want or got is want, name
    if isinstance(base, VocabParallelEmbedding):
        for name in ("num_embeddings", "org_vocab_size", "embedding_dim", "weight"):
            assert getattr(wrapper, name) is getattr(base, name)
        assert wrapper.num_embeddings % 64 == 0 and wrapper.org_vocab_size == 100


def test_missing_attribute_still_raises() -> None:
    base = ReplicatedLinear(4, 4)
    wrapper = wrapper_for(base)(base)
    with pytest.raises(AttributeError):
        wrapper.no_such_attribute


def _ctx(slots: list[int]) -> ForwardContext:
    n = len(slots)
    z = torch.zeros(n, dtype=torch.int64)
    attn = AttentionMetadata.build([1] * n, [1] * n, [[0]] * n, 1, z.device)  # n one-token sequences
    b = LoRABatch.from_row_slots(slots, torch.device("cpu"))
    return ForwardContext(positions=z, attn=attn, lora=b, lora_logits=b)


@pytest.mark.parametrize("base_cls", list(BASE_LAYERS), ids=lambda c: c.__name__)
def test_base_rows_exact_and_lora_rows_match_reference(base_cls) -> None:
    torch.manual_seed(0)
    base = BASE_LAYERS[base_cls]()
    for p in base.parameters():
        p.data.normal_()
    wrapper = wrapper_for(base)(base)
    wrapper.create_lora_weights(3, 8, get_backend("torch"))
    is_emb = isinstance(base, VocabParallelEmbedding) and not isinstance(base, ParallelLMHead)
    if is_emb:
        x = torch.randint(0, base.org_vocab_size, (6,))
        lw = LoRAWeights(torch.randn(4, base.org_vocab_size), torch.randn(base.embedding_dim, 4), 0.5)
        weights = [lw]
    else:
        in_f = base.embedding_dim if isinstance(base, ParallelLMHead) else base.input_size
        x = torch.randn(6, in_f)
        sizes = list(getattr(base, "output_sizes", None) or [getattr(base, "output_size", None) or base.org_vocab_size])
        weights = [LoRAWeights(torch.randn(r, in_f), torch.randn(n, r), 0.25 * (i + 1))
                   for i, (n, r) in enumerate(zip(sizes, [4, 2, 8]))]
        if len(weights) > 1:
            weights[-1] = None  # the last slice is not targeted by this adapter
    wrapper.set_lora(1, weights)
    slots = [-1, 1, 1, -1, 0, 1]  # slot 0 holds nothing for this layer
    with torch.no_grad(), forward_context(_ctx(slots)):
        got = wrapper(x)
    want = base(x)
    # base rows and rows of a slot without weights: bit-for-bit the base output
    for row in (0, 3, 4):
        assert torch.equal(got[row], want[row])
    delta = torch.zeros_like(want)
    if is_emb:
        lw = weights[0]
        delta[:] = (lw.A.T[x] @ lw.B.T) * lw.scaling
    else:
        off = 0
        for lw, n in zip(weights, wrapper.output_slices):
            if lw is not None:
                delta[:, off:off + lw.B.shape[0]] = (x @ lw.A.T @ lw.B.T) * lw.scaling
            off += n
    for row in (1, 2, 5):
        torch.testing.assert_close(got[row], want[row] + delta[row], rtol=1e-5, atol=1e-4)
    # clearing the slot restores the base output
    wrapper.reset_lora(1)
    with torch.no_grad(), forward_context(_ctx(slots)):
        assert torch.equal(wrapper(x), want)
