"""Paged attention: the PyTorch reference against a naive dense causal implementation, and the Triton
kernels (unified varlen and split-K decode) against the reference.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here and in conftest.py before
triton is imported). Caches are random everywhere, so keys past a sequence's length, in other sequences'
blocks or outside its window must be masked; block tables are shuffled, and lengths leave the last block
partial. Cases: GQA 1/2/4, block sizes 8/16, sliding windows, pure decode, pure prefill, and mixed steps
(decodes first, then prefill chunks continuing a cached prefix), float32 and bfloat16; and whole engines on
the Triton backend against the torch backend: Llama, Mistral's sliding window and Qwen2-VL's M-RoPE with images.
"""

from __future__ import annotations

import os
import random
from typing import Optional

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton kernels

from loraplex.attention.metadata import AttentionMetadata  # noqa: E402
from loraplex.attention.reference import paged_attention_ref  # noqa: E402
from loraplex.attention.registry import get_attention_backend, resolve_attention_backend  # noqa: E402

KVH = 2
# (new tokens, cache length after the step) per sequence
SCENARIOS = {
    "decode": [(1, 1), (1, 17), (1, 40), (1, 9)],
    "prefill": [(13, 13), (5, 5), (21, 21)],
    "mixed": [(1, 30), (1, 7), (6, 22), (9, 9), (1, 16)],  # the last decode is not in the leading run
}


def make_case(spec: list[tuple[int, int]], gqa: int, block_size: int, dtype: torch.dtype, head_dim: int = 64,
              device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    tables: list[list[int]] = []
    need = [-(-L // block_size) for _, L in spec]
    num_blocks = sum(need) + 3  # spare blocks hold garbage no sequence owns
    phys = list(range(num_blocks))
    rng.shuffle(phys)
    for n in need:
        tables.append([phys.pop() for _ in range(n)])
    T = sum(n for n, _ in spec)
    H = KVH * gqa
    q = torch.randn(T, H, head_dim, generator=g).to(dtype).to(device)
    kc = torch.randn(num_blocks, block_size, KVH, head_dim, generator=g).to(dtype).to(device)
    vc = torch.randn(num_blocks, block_size, KVH, head_dim, generator=g).to(dtype).to(device)
    meta = AttentionMetadata.build([n for n, _ in spec], [L for _, L in spec], tables, block_size,
                                   torch.device(device))
    return q, kc, vc, meta, tables


def naive_attention(q, kc, vc, spec, tables, scale: float, window: Optional[int]) -> torch.Tensor:
    """Dense float64 attention per sequence: keys gathered position by position, explicit causal mask."""
    bs = kc.shape[1]
    H = q.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    row = 0
    for (n, L), table in zip(spec, tables):
        keys = torch.stack([kc[table[p // bs], p % bs] for p in range(L)]).double()  # (L, KVH, D)
        vals = torch.stack([vc[table[p // bs], p % bs] for p in range(L)]).double()
        keys = keys.repeat_interleave(H // keys.shape[1], dim=1)  # (L, H, D)
        vals = vals.repeat_interleave(H // vals.shape[1], dim=1)
        qs = q[row:row + n].double()  # (n, H, D)
        scores = torch.einsum("nhd,lhd->hnl", qs, keys) * scale
        qpos = torch.arange(L - n, L).view(n, 1)
        kpos = torch.arange(L).view(1, L)
        visible = kpos <= qpos
        if window is not None:
            visible &= kpos > qpos - window
        scores = scores.masked_fill(~visible, float("-inf"))
        out[row:row + n] = torch.einsum("hnl,lhd->nhd", scores.softmax(-1), vals)
        row += n
    return out


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("block_size,window", [(8, None), (16, 6), (8, 11)])
def test_reference_matches_naive(scenario: str, gqa: int, block_size: int, window: Optional[int]) -> None:
    spec = SCENARIOS[scenario]
    q, kc, vc, meta, tables = make_case(spec, gqa, block_size, torch.float32)
    scale = 64 ** -0.5
    got = paged_attention_ref(q, kc, vc, meta, scale, window)
    want = naive_attention(q, kc, vc, spec, tables, scale, window)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_metadata_layout() -> None:
    meta = AttentionMetadata.build([1, 1, 4], [5, 9, 4], [[3], [1, 0], [2]], 8, torch.device("cpu"))
    assert meta.query_start_loc.tolist() == [0, 1, 2, 6] and meta.query_start_loc.dtype == torch.int32
    assert meta.seq_lens.tolist() == [5, 9, 4] and meta.seq_lens.dtype == torch.int32
    pad = [0] * 14  # rows padded to 16 entries
    assert meta.block_tables.tolist() == [[3, 0, *pad], [1, 0, *pad], [2, 0, *pad]]
    assert meta.block_tables.dtype == torch.int32
    # every field on a 16-byte boundary and table rows of 16 entries: kernels compile one variant, whatever B
    for b in range(1, 9):
        m = AttentionMetadata.build([1] * b, [3] * b, [[1]] * b, 8, torch.device("cpu"))
        assert all(t.data_ptr() % 16 == 0 for t in (m.query_start_loc, m.seq_lens, m.block_tables))
        assert m.block_tables.stride(0) == 16 and m.seq_lens.tolist() == [3] * b
    assert meta.slot_mapping.tolist() == [3 * 8 + 4, 0 * 8 + 0, 16, 17, 18, 19]
    assert (meta.max_query_len, meta.max_seq_len, meta.num_decodes) == (4, 9, 2)


def test_registry() -> None:
    assert resolve_attention_backend("auto", torch.device("cpu")) == "torch"
    assert get_attention_backend("torch").name == "torch"
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        get_attention_backend("flash")


# --- Triton kernels ---------------------------------------------------------------------------------

triton = pytest.importorskip("triton", reason="the Triton attention kernels need the triton package")
from loraplex.attention.triton_attention import paged_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

# (scenario, gqa, block size, window, dtype, splits): every axis covered without the full product,
# so the interpreter run stays short.
KERNEL_CASES = [
    ("decode", 1, 8, None, torch.float32, 1),
    ("decode", 2, 16, 6, torch.bfloat16, 1),
    ("decode", 4, 16, None, torch.float32, 4),
    ("decode", 2, 8, 11, torch.float32, 2),
    ("decode", 1, 16, 7, torch.bfloat16, 4),
    ("prefill", 1, 16, None, torch.float32, 1),
    ("prefill", 2, 8, 6, torch.float32, 1),
    ("prefill", 4, 16, 11, torch.bfloat16, 1),
    ("mixed", 1, 8, None, torch.bfloat16, 1),
    ("mixed", 2, 16, None, torch.float32, 2),
    ("mixed", 4, 8, 6, torch.float32, 1),
    ("mixed", 2, 8, 11, torch.bfloat16, 4),
]


def _check_kernel(scenario, gqa, block_size, window, dtype, splits, head_dim: int = 64, tile_n: int = 32) -> None:
    spec = SCENARIOS[scenario]
    q, kc, vc, meta, _ = make_case(spec, gqa, block_size, dtype, head_dim, DEVICE, seed=gqa * 7 + block_size)
    scale = head_dim ** -0.5
    got = paged_attention(q, kc, vc, meta, scale, window, num_splits=splits, tile_n=tile_n)
    want = paged_attention_ref(q.float(), kc.float(), vc.float(), meta, scale, window)
    torch.testing.assert_close(got.float(), want, **TOL[dtype])


@pytest.mark.parametrize("scenario,gqa,block_size,window,dtype,splits", KERNEL_CASES,
                         ids=[f"{c[0]}-g{c[1]}-bs{c[2]}-w{c[3]}-{str(c[4])[6:]}-s{c[5]}" for c in KERNEL_CASES])
def test_triton_matches_reference(scenario, gqa, block_size, window, dtype, splits) -> None:
    _check_kernel(scenario, gqa, block_size, window, dtype, splits)


@pytest.mark.parametrize("head_dim", [16, 24])
def test_triton_small_and_padded_head_dims(head_dim: int) -> None:
    """head_dim 16 (the test models') and a non-power of two (padded, masked loads)."""
    _check_kernel("mixed", 2, 8, None, torch.float32, 2, head_dim=head_dim, tile_n=16)


def test_triton_backend_through_registry() -> None:
    spec = SCENARIOS["mixed"]
    q, kc, vc, meta, _ = make_case(spec, 2, 16, torch.float32, device=DEVICE)
    backend = get_attention_backend("triton", torch.device(DEVICE))
    got = backend.forward(q, kc, vc, meta, 0.125, None)
    torch.testing.assert_close(got, paged_attention_ref(q, kc, vc, meta, 0.125), **TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_on_cuda(dtype: torch.dtype, head_dim: int) -> None:
    """The same kernels compiled on a GPU, bigger shapes, the split heuristic and forced splits."""
    spec = [(1, 700), (1, 1500), (1, 33), (37, 300), (130, 130)]
    for splits in (None, 1, 8):
        for window in (None, 100):
            q, kc, vc, meta, _ = make_case(spec, 4, 16, dtype, head_dim, "cuda", seed=3)
            got = paged_attention(q, kc, vc, meta, head_dim ** -0.5, window, num_splits=splits)
            want = paged_attention_ref(q.float(), kc.float(), vc.float(), meta, head_dim ** -0.5, window)
            tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(got.float(), want, **tol)


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("mistral", {"sliding_window": 5})])
def test_engine_with_triton_backend_matches_torch(tmp_path, family: str, overrides: dict) -> None:
    """The whole engine on the Triton backend (on CUDA where there is one, else in the interpreter on the CPU)
    gives the torch backend's tokens and logprobs: small chunks make steps that mix decodes with prefill chunks
    over a cached prefix."""
    from helpers import make_tiny_model

    from loraplex import LLM, SamplingParams

    model_dir = make_tiny_model(tmp_path / family, family=family, **overrides)
    prompts = [{"prompt_token_ids": p} for p in ([5, 17, 33, 99, 120, 7, 8, 250, 3, 4, 5, 6, 77, 78], [42, 43, 44],
                                                 [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70])]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
    outs = {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 GEMMs on CUDA, as on the CPU
    try:
        for backend in ("torch", "triton"):
            llm = LLM(model_dir, dtype="float32", device=device, block_size=4, num_kv_blocks=64, seed=0,
                      max_num_seqs=4, max_num_batched_tokens=8, attention_backend=backend)
            outs[backend] = llm.generate(prompts, params, use_tqdm=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for a, b in zip(outs["torch"], outs["triton"]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-4 for t in x)


def test_mrope_model_with_triton_backend_matches_torch(tmp_path) -> None:
    """An M-RoPE model (Qwen2-VL: three position streams, image tokens' positions on a grid) on the Triton
    backend gives the torch backend's tokens and logprobs over image and text prompts; a budget of 8 tokens
    makes steps that mix decodes with prompt chunks."""
    from vlm_helpers import image_prompt, make_image, make_tiny_vlm

    from loraplex import LLM, SamplingParams

    model_dir = make_tiny_vlm(tmp_path / "qwen2_vl", family="qwen2_vl")
    prompts = [{"prompt": image_prompt(model_dir, "{image}Describe the robot"),
                "multi_modal_data": {"image": [make_image(1, 32, 32)]}},
               {"prompt": image_prompt(model_dir, "The storm came from the west")},
               {"prompt": image_prompt(model_dir, "Compare {image} and {image} now"),
                "multi_modal_data": {"image": [make_image(2, 24, 40), make_image(3, 40, 16)]}}]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    outs = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for backend in ("torch", "triton"):
            llm = LLM(model_dir, dtype="float32", device=device, block_size=4, num_kv_blocks=256, seed=0,
                      max_num_seqs=4, max_num_batched_tokens=8, attention_backend=backend, enforce_eager=True)
            outs[backend] = llm.generate(prompts, params, use_tqdm=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for a, b in zip(outs["torch"], outs["triton"]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-4 for t in x)


def test_decode_split_rule(monkeypatch) -> None:
    """Decode splits aim at about four programs per SM over (decodes x kv heads), a power of two up to 16, each
    split at least a key tile, none for no decodes (figures of an H200's 132 SMs and the 8B shape's 8 kv heads,
    at a graph's capture context of 8,192 and at short contexts)."""
    import loraplex.attention.triton_attention as ta

    monkeypatch.setattr(ta, "num_sms", lambda device=None: 132)
    at = {n: ta.decode_splits(n, 8, 8192) for n in (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)}
    assert at == {0: 1, 1: 16, 2: 16, 4: 16, 8: 8, 16: 4, 32: 2, 64: 1, 128: 1, 256: 1}
    assert ta.decode_splits(1, 8, 100) == 1  # one key tile: nothing to split
    assert ta.decode_splits(1, 8, 192) == 2  # three key tiles
    assert ta.decode_splits(32, 8, 192) == 2
