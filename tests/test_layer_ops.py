"""The fused layer kernels (loraplex.kernels.layer_ops) against the layers' PyTorch code, which is their
reference. On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton kernels

from loraplex.kernels import layer_ops  # noqa: E402
from loraplex.layers.activation import GatedActivation  # noqa: E402
from loraplex.layers.norm import RMSNorm  # noqa: E402
from loraplex.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tol(dtype: torch.dtype) -> dict:
    """float32: reduction order only; half dtypes: two rounding steps (an intermediate rounding of the
    reference may fall the other way after a float32 reduction in another order)."""
    eps = torch.finfo(dtype).eps
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2 * eps, rtol=2 * eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 100])
def test_rms_norm_equals_reference(dtype, n) -> None:
    g = torch.Generator().manual_seed(n)
    norm = RMSNorm(n, eps=1e-5)
    norm.weight.data = torch.randn(n, generator=g).to(dtype)
    x = (torch.randn(7, n, generator=g) * 3).to(dtype)
    res = torch.randn(7, n, generator=g).to(dtype)
    want = norm(x)  # CPU: the reference
    want_r, want_sum = norm(x, res.clone())
    norm_w = norm.weight.to(DEVICE)
    got = layer_ops.rms_norm(x.to(DEVICE), norm_w, 1e-5).cpu()
    res_d = res.to(DEVICE)
    got_r = layer_ops.rms_norm(x.to(DEVICE), norm_w, 1e-5, res_d).cpu()
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, **_tol(dtype))
    torch.testing.assert_close(got_r, want_r, **_tol(dtype))
    # the residual sum is written back, rounded as the model rounds (Triton's interpreter truncates float32 to
    # bfloat16 rather than rounding to nearest: one step apart there)
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        torch.testing.assert_close(res_d.cpu(), want_sum, atol=0, rtol=torch.finfo(dtype).eps)
    else:
        assert torch.equal(res_d.cpu(), want_sum)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rotary_dim", [(16, 16), (32, 16), (24, 24)])
def test_rotary_equals_reference_in_place(dtype, head_dim, rotary_dim) -> None:
    g = torch.Generator().manual_seed(head_dim + rotary_dim)
    rope = RotaryEmbedding(head_dim, 64, {"rope_theta": 10000.0, "rope_type": "default"}, rotary_dim)
    T, HQ, HK = 5, 4, 2
    qkv = torch.randn(T, (HQ + 2 * HK) * head_dim, generator=g).to(dtype)
    q = qkv[:, :HQ * head_dim].view(T, HQ, head_dim)  # strided views of one fused projection, as in the model
    k = qkv[:, HQ * head_dim:(HQ + HK) * head_dim].view(T, HK, head_dim)
    positions = torch.tensor([0, 3, 17, 63, 5])
    want_q, want_k = rope(positions, q, k)
    qkv_d = qkv.to(DEVICE)
    q_d = qkv_d[:, :HQ * head_dim].view(T, HQ, head_dim)
    k_d = qkv_d[:, HQ * head_dim:(HQ + HK) * head_dim].view(T, HK, head_dim)
    layer_ops.rotary(positions.to(DEVICE), q_d, k_d, rope.cos.to(DEVICE), rope.sin.to(DEVICE), rotary_dim)
    torch.testing.assert_close(q_d.cpu(), want_q, **_tol(dtype))
    torch.testing.assert_close(k_d.cpu(), want_k, **_tol(dtype))
    assert torch.equal(qkv_d[:, (HQ + HK) * head_dim:].cpu(), qkv[:, (HQ + HK) * head_dim:])  # v untouched


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("head_dim,rotary_dim", [(16, 16), (24, 16)])
def test_rotary_writes_the_cache_as_index_copy_would(dtype, cache_dtype, head_dim, rotary_dim) -> None:
    """The fused rotary with caches: q and k rotated in place as without them, the rotated k (features past
    rotary_dim unrotated) and v written at the slot mapping in the cache's dtype, a negative slot skipped,
    every other cache row untouched."""
    g = torch.Generator().manual_seed(7 * head_dim + rotary_dim)
    rope = RotaryEmbedding(head_dim, 64, {"rope_theta": 10000.0, "rope_type": "default"}, rotary_dim)
    T, HQ, HK, slots = 5, 4, 2, 12
    qkv = torch.randn(T, (HQ + 2 * HK) * head_dim, generator=g).to(dtype)
    views = lambda t: (t[:, :HQ * head_dim].view(T, HQ, head_dim),  # noqa: E731
                       t[:, HQ * head_dim:(HQ + HK) * head_dim].view(T, HK, head_dim),
                       t[:, (HQ + HK) * head_dim:].view(T, HK, head_dim))
    q, k, v = views(qkv)
    positions = torch.tensor([0, 3, 17, 63, 5])
    slot_mapping = torch.tensor([9, 2, -1, 11, 0])
    kc0 = torch.randn(slots, HK, head_dim, generator=g).to(cache_dtype)
    vc0 = torch.randn(slots, HK, head_dim, generator=g).to(cache_dtype)
    want_q, want_k = rope(positions, q, k)
    ok = slot_mapping >= 0
    want_kc, want_vc = kc0.clone(), vc0.clone()
    want_kc.index_copy_(0, slot_mapping[ok], want_k[ok].to(cache_dtype))
    want_vc.index_copy_(0, slot_mapping[ok], v[ok].to(cache_dtype))
    qkv_d = qkv.to(DEVICE)
    q_d, k_d, v_d = views(qkv_d)
    kc, vc = kc0.to(DEVICE), vc0.to(DEVICE)
    layer_ops.rotary(positions.to(DEVICE), q_d, k_d, rope.cos.to(DEVICE), rope.sin.to(DEVICE), rotary_dim,
                     v_d, kc, vc, slot_mapping.to(DEVICE))
    torch.testing.assert_close(q_d.cpu(), want_q, **_tol(dtype))
    torch.testing.assert_close(k_d.cpu(), want_k, **_tol(dtype))
    torch.testing.assert_close(kc.cpu(), want_kc, **_tol(cache_dtype))
    if dtype == cache_dtype or DEVICE != "cpu":
        assert torch.equal(vc.cpu(), want_vc)  # copied, converted once
    else:  # Triton's interpreter truncates float32 to bfloat16 rather than rounding to nearest
        torch.testing.assert_close(vc.cpu(), want_vc, atol=0, rtol=torch.finfo(cache_dtype).eps)
    assert torch.equal(kc.cpu()[[1, 3, 4, 5, 6, 7, 8, 10]], kc0[[1, 3, 4, 5, 6, 7, 8, 10]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [48, 1500])
def test_silu_and_mul_equals_reference(dtype, n) -> None:
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(3, 2 * n, generator=g) * 4).to(dtype)
    want = GatedActivation("silu")(x)
    got = layer_ops.silu_and_mul(x.to(DEVICE)).cpu()
    assert got.shape == (3, n)
    torch.testing.assert_close(got, want, **_tol(dtype))


def _pending(T: int, widths: list[int], extras: bool, bias: bool, g: torch.Generator):
    """A PendingDelta over ``widths`` slices: rows of slot -1 (none), of a slot of rank 0 in the first slice,
    and of slots with weights; with ``extras`` a LoRA bias and DoRA scale row for slot 2 (and none for slot 1)."""
    from loraplex.kernels.lora_expand import PendingDelta

    n = sum(widths)
    slots = torch.tensor([-1, 0, 1, 2, 2, 1, -1][:T], dtype=torch.int64)
    ranks = torch.tensor([[0, 8, 4]] + [[8, 8, 4]] * (len(widths) - 1), dtype=torch.int32)  # slot 0: rank 0 in slice 0
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    meta = torch.tensor([[o, w] for o, w in zip(offsets, widths)], dtype=torch.int32)
    delta = torch.randn(T, n, generator=g)
    ex = None
    if extras:
        ext = torch.stack([torch.randn(2, n, generator=g) * torch.tensor([[0.5], [0.0]]) + torch.tensor([[0.0], [1.0]])
                           + torch.tensor([[0.0], [0.1]]) * torch.randn(2, n, generator=g)])  # (1 row, 2, n)
        ex = (ext.to(DEVICE), torch.tensor([-1, -1, 0], dtype=torch.int32, device=DEVICE))
    b = torch.randn(n, generator=g) if bias else None
    return PendingDelta(delta.to(DEVICE), slots.to(DEVICE), ranks.to(DEVICE), meta.to(DEVICE), max(widths), ex,
                        None if b is None else b.to(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extras,bias", [(False, False), (True, False), (True, True)])
def test_rms_norm_folds_a_pending_lora_delta(dtype, extras, bias) -> None:
    """``rms_norm(x, ..., delta=d)`` equals ``lora_add_delta`` into x and then ``rms_norm``, bit for bit: rows of
    no slot and slices of rank 0 untouched, the extras (LoRA bias, DoRA scale, around the base bias) applied."""
    g = torch.Generator().manual_seed(3)
    n = 96
    pd = _pending(7, [n], extras, bias, g)
    w = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    x = (torch.randn(7, n, generator=g) * 3).to(dtype).to(DEVICE)
    res = torch.randn(7, n, generator=g).to(dtype).to(DEVICE)
    for residual in (None, res):
        added = x.clone()
        pd.apply(added)
        assert not torch.equal(added, x)  # the delta does change some rows
        r_want = None if residual is None else residual.clone()
        want = layer_ops.rms_norm(added, w, 1e-5, r_want)
        r_got = None if residual is None else residual.clone()
        x_in = x.clone()
        got = layer_ops.rms_norm(x_in, w, 1e-5, r_got, delta=pd)
        assert torch.equal(got, want) and torch.equal(x_in, x)
        if residual is not None:
            assert torch.equal(r_got, r_want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extras,bias", [(False, False), (True, True)])
def test_silu_and_mul_folds_a_pending_lora_delta(dtype, extras, bias) -> None:
    """``silu_and_mul(x, delta=d)`` equals ``lora_add_delta`` into the ``[gate | up]`` input and then
    ``silu_and_mul``, bit for bit, each slice with its own rank (slot 0 has none in the gate)."""
    g = torch.Generator().manual_seed(4)
    n = 80
    pd = _pending(7, [n, n], extras, bias, g)
    x = (torch.randn(7, 2 * n, generator=g) * 2).to(dtype).to(DEVICE)
    added = x.clone()
    pd.apply(added)
    want = layer_ops.silu_and_mul(added)
    got = layer_ops.silu_and_mul(x, delta=pd)
    assert torch.equal(got, want)
    assert not torch.equal(got, layer_ops.silu_and_mul(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,rotary_dim", [(16, 16), (24, 16)])
@pytest.mark.parametrize("extras,bias", [(False, False), (True, True)])
def test_rotary_folds_a_pending_qkv_delta(dtype, head_dim, rotary_dim, extras, bias) -> None:
    """The fused rotary with caches and the qkv layer's pending LoRA delta (slices q, k, v, each with its own
    rank; slot 0 has none in q): q and k in place and both caches equal, bit for bit, to ``lora_add_delta`` into
    the layer's output and then the rotary, features past rotary_dim included."""
    g = torch.Generator().manual_seed(head_dim + rotary_dim)
    rope = RotaryEmbedding(head_dim, 64, {"rope_theta": 10000.0, "rope_type": "default"}, rotary_dim)
    T, HQ, HK, slots = 7, 4, 2, 12
    widths = [HQ * head_dim, HK * head_dim, HK * head_dim]
    pd = _pending(T, widths, extras, bias, g)
    qkv = torch.randn(T, sum(widths), generator=g).to(dtype).to(DEVICE)
    views = lambda t: (t[:, :widths[0]].view(T, HQ, head_dim),  # noqa: E731
                       t[:, widths[0]:widths[0] + widths[1]].view(T, HK, head_dim),
                       t[:, widths[0] + widths[1]:].view(T, HK, head_dim))
    positions = torch.tensor([0, 3, 17, 63, 5, 8, 9], device=DEVICE)
    slot_mapping = torch.tensor([9, 2, -1, 11, 0, 4, 6], device=DEVICE)
    kc0 = torch.randn(slots, HK, head_dim, generator=g).to(dtype).to(DEVICE)
    vc0 = torch.randn(slots, HK, head_dim, generator=g).to(dtype).to(DEVICE)
    cos, sin = rope.cos.to(DEVICE), rope.sin.to(DEVICE)
    added = qkv.clone()
    pd.apply(added)
    want_kc, want_vc = kc0.clone(), vc0.clone()
    layer_ops.rotary(positions, *views(added)[:2], cos, sin, rotary_dim, views(added)[2], want_kc, want_vc,
                     slot_mapping)
    got = qkv.clone()
    kc, vc = kc0.clone(), vc0.clone()
    q, k, v = views(got)
    layer_ops.rotary(positions, q, k, cos, sin, rotary_dim, v, kc, vc, slot_mapping, delta=pd, qkv=got)
    wq, wk, _ = views(added)
    assert torch.equal(q, wq) and torch.equal(k, wk) and torch.equal(kc, want_kc) and torch.equal(vc, want_vc)
    plain_kc = kc0.clone()
    layer_ops.rotary(positions, *views(qkv.clone())[:2], cos, sin, rotary_dim, views(qkv)[2], plain_kc, vc0.clone(),
                     slot_mapping)
    assert not torch.equal(plain_kc, kc)  # the delta changed the keys
